"""Where SSIM is won or lost: each method's SSIM map split into the ground truth's background and foreground.

    python -m benchmarks.ssim_regions RUN [RUN ...] [--threshold 0.05] [--out FOLDER]

``RUN`` is the ``--out`` folder of an ``idm benchmark`` run made with its
images (without ``--no-images``): its reconstructions
``recon/<method>/<image>.png`` and its ``benchmark.json``, from which every
ground truth is read again (the file and slice it records; a file whose
SHA-256 has changed since is refused). SSIM is scikit-image's, as the
benchmark scores it, here with its full map (7x7 windows): the background is
where the ground truth's scored image (the MRI magnitude, the CS Y channel,
all channels' mean otherwise) lies below ``--threshold`` (values in [0, 1]),
the foreground the rest. For every method and image it gives the SSIM over
the whole image and the mean of the map over each region, and the mean
absolute error in each region. The reconstructions are read from 8-bit
PNGs, so the whole-image SSIM can differ from ``results.csv`` in the third
decimal; colour images are compared as the mean of their channels (grey),
so theirs is not the benchmark's per-channel SSIM. Writes ``FOLDER/ssim_regions.csv`` and ``.md`` (default: ``RUN``)
and prints the table of means over the images.

Several runs of one problem (e.g. a method run image by image, each with the
seed of its index in a larger run) are pooled as ``benchmarks.tradeoff``
pools them: runs of another problem, or that add images of one method run
with other settings, are refused, an image that two runs scored with one
method keeps the first run's, and ``--out`` is then required.

Typical use: a method ahead in PSNR but behind in SSIM on MR images, whose
background is half the picture and where SSIM's small-signal windows punish
faint residual aliasing that a flat (TV) or strongly denoised output avoids.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

import tasks
from benchmarks.compare import read_record, read_results
from benchmarks.harness import load_images
from benchmarks.report import rounded, run_script, script_command, write_csv_and_markdown
from benchmarks.tradeoff import check_poolable

#: The columns of ``ssim_regions.csv``; SSIM values in [-1, 1], errors in [0, 1], fractions in [0, 1].
FIELDS = ("method", "image", "ssim", "background_ssim", "foreground_ssim", "background_fraction",
          "background_abs_error", "foreground_abs_error")  # fmt: skip


def ground_truths(run: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The run's record (its ``benchmark.json``) and its scored ground-truth images by name: ``(H, W)``
    float64 in [0, 1].

    A ``ValueError`` naming ``run`` when it holds no ``benchmark.json`` with the images it read, or a file
    it read is missing or changed.
    """
    record = read_record(run)
    if record is None or not isinstance(record.get("task"), dict) or not record.get("inputs"):
        raise ValueError(f"{run} has no benchmark.json naming its task and images: give an idm benchmark --out folder")
    task = tasks.get(record["task"]["name"])
    read: dict[str, list] = {}  # each file once: a volume's slices share it
    truths = {}
    for entry in record["inputs"]:
        source = entry.get("file")
        if source is None:
            raise ValueError(f"{run}: image {entry.get('name')!r} was not read from a file; its ground truth cannot be read again")
        if source not in read:
            if not Path(source).is_file():
                raise ValueError(f"{run}: image {entry['name']!r} came from {source}, which is not there (run from the folder the benchmark ran in)")
            read[source] = load_images(task, [source], size=record.get("resized_to"))  # hashes the file too
        image = next((s for s in read[source] if s.slice == entry.get("slice", 0)), None)
        if image is None:
            raise ValueError(f"{run}: {source} has no slice {entry.get('slice')}")
        if entry.get("sha256") and image.sha256 != entry["sha256"]:
            raise ValueError(f"{run}: {source} changed since the benchmark read it (SHA-256 differs)")
        scored = task.metric_image(image.x[None])[0].double().clamp(0, 1)
        truths[entry["name"]] = scored.mean(dim=0).numpy()
    return record, truths


def read_reconstruction(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A saved reconstruction as ``(H, W)`` float64 in [0, 1] (the mean of its channels), checked against
    ``shape``; a ``ValueError`` naming the file when it is missing, unreadable or of another size."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image, dtype=np.float64) / 255.0
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the reconstruction {path}: {err} (was the benchmark run with --no-images?)") from err
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=2)
    if pixels.shape != shape:
        raise ValueError(f"{path} is {pixels.shape[0]}x{pixels.shape[1]}, its ground truth {shape[0]}x{shape[1]}")
    return pixels


def region_scores(estimate: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """SSIM and absolute error of ``estimate`` against ``truth`` (both ``(H, W)`` in [0, 1]) over the whole
    image and over the background (``truth < threshold``) and the foreground; a region that is empty
    scores NaN."""
    whole, ssim_map = structural_similarity(estimate, truth, data_range=1.0, full=True)
    background = truth < threshold
    error = np.abs(estimate - truth)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    return {
        "ssim": float(whole), "background_ssim": mean(ssim_map[background]), "foreground_ssim": mean(ssim_map[~background]),
        "background_fraction": float(background.mean()), "background_abs_error": mean(error[background]),
        "foreground_abs_error": mean(error[~background]),
    }  # fmt: skip


def markdown_table(rows: Sequence[dict[str, Any]], threshold: float) -> str:
    """Means over each method's images of every column of :data:`FIELDS`."""
    lines = [
        f"Ground-truth background: scored image below {threshold:g}.",
        "",
        "| method | images | SSIM | background SSIM | foreground SSIM | background fraction | background abs error | foreground abs error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        means = [statistics.fmean(row[key] for row in mine) for key in FIELDS[2:]]
        lines.append(f"| `{method}` | {len(mine)} | " + " | ".join(f"{value:.4f}" for value in means) + " |")
    return "\n".join(lines) + "\n"


def region_rows(run: Path, threshold: float, skip: set[tuple[str, str]] = frozenset()) -> list[dict[str, Any]]:
    """One row of :data:`FIELDS` per method and image of ``run``'s reconstructions (:func:`region_scores`),
    but for the ``(method, image)`` pairs in ``skip`` (scored from an earlier run); a ``ValueError`` when
    it kept none."""
    record, truths = ground_truths(run)
    methods = [m for m in record.get("methods", []) if (run / "recon" / m).is_dir()]
    if not methods:
        raise ValueError(f"{run} holds no reconstructions (recon/<method>/): rerun the benchmark without --no-images")
    rows = []
    for method in methods:
        for name, truth in truths.items():
            if (method, name) in skip:
                continue
            estimate = read_reconstruction(run / "recon" / method / f"{name}.png", truth.shape)
            rows.append({"method": method, "image": name, **region_scores(estimate, truth, threshold)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ssim_regions", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="idm benchmark --out folders, run with their images")
    parser.add_argument("--threshold", type=float, default=0.05, help="background: ground truth below this (default 0.05)")
    parser.add_argument("--out", type=Path, default=None, help="where to write ssim_regions.csv/.md (default: RUN, when one)")
    args = parser.parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must lie in (0, 1), got {args.threshold}")
    if len(args.runs) > 1:
        if args.out is None:
            parser.error("--out is required with several runs (their pooled table belongs to none of them)")
        check_poolable([(run, read_results(run)) for run in args.runs])
    rows = []
    for run in args.runs:  # an image that two runs scored with one method: the first's
        rows += region_rows(run, args.threshold, skip={(row["method"], row["image"]) for row in rows})
    markdown = f"`{script_command('benchmarks.ssim_regions', argv)}`\n\n{markdown_table(rows, args.threshold)}"
    write_csv_and_markdown(args.out or args.runs[0], "ssim_regions", rounded(rows), FIELDS, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.ssim_regions"))
