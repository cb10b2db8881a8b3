"""Compare ``idm benchmark`` runs image by image: how far one run's scores are from another's.

    python -m benchmarks.compare BASE OTHER [BASE OTHER ...] --out FOLDER

Each pair is two ``idm benchmark --out`` folders (their ``results.csv``)
that scored the same images, for example one model in float32 and in
bfloat16, or two checkpoints. For every method that both runs scored (or
``--methods``), over the images both scored (status ``ok``, finite PSNR),
the table gives each run's mean PSNR and SSIM, the mean difference
``OTHER - BASE`` and the largest absolute difference on one image (and
which image). Images that only one run scored are counted in the last
column, not compared. Runs whose ``benchmark.json`` records another task,
operator, protocol or operator seeds are refused, and so are runs in which an
image of one name is another file's content (or slice), was scored at another
size or measured by another operator draw (a folder's images in another order). Writes
``FOLDER/comparison.csv`` and ``FOLDER/comparison.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from benchmarks.report import rounded, run_script, script_command, write_csv_and_markdown

#: The columns of ``comparison.csv``.
FIELDS = (
    "base", "other", "method", "images", "base_psnr", "other_psnr", "mean_psnr_difference", "largest_psnr_difference",
    "largest_psnr_image", "base_ssim", "other_ssim", "mean_ssim_difference", "largest_ssim_difference", "left_out",
)  # fmt: skip


@dataclass(frozen=True)
class Score:
    """One image's scores in one run: PSNR in dB, SSIM in [-1, 1]."""

    psnr: float
    ssim: float


#: The columns of a ``results.csv`` read as numbers (``peak_mem_mb`` only where the run measured memory).
NUMBER_COLUMNS = ("psnr", "ssim", "seconds", "nfe", "peak_mem_mb")


def read_results(folder: Path) -> list[dict]:
    """The rows of ``folder``'s ``results.csv`` that scored an image (status ``ok``): ``method`` and ``image``
    as text, :data:`NUMBER_COLUMNS` as floats (``None`` where a column is absent or empty).

    A ``ValueError`` naming the folder when it is not a benchmark folder or its CSV lacks a column or a number.
    """
    path = folder / "results.csv"
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give the --out folder of an idm benchmark run")
    if not path.is_file():
        raise ValueError(f"{folder} holds no results.csv: it is not the --out folder of an idm benchmark run")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"method", "image", "psnr", "ssim", "status"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: not an idm benchmark results.csv")
        rows = []
        for line, row in enumerate(reader, start=2):
            if row["status"] != "ok":
                continue
            try:
                numbers = {"psnr": float(row["psnr"]), "ssim": float(row["ssim"])}
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: PSNR {row['psnr']!r} / SSIM {row['ssim']!r} are not numbers") from None
            for key in NUMBER_COLUMNS[2:]:  # the optional ones
                try:
                    numbers[key] = float(row[key]) if row.get(key) not in (None, "") else None
                except ValueError:
                    raise ValueError(f"{path}, line {line}: {key} {row[key]!r} is not a number") from None
            rows.append({"method": row["method"], "image": row["image"], **numbers})
    return rows


def read_scores(folder: Path) -> dict[str, dict[str, Score]]:
    """``{method: {image: Score}}`` of the images ``folder``'s ``results.csv`` scored (status ``ok``);
    the errors of :func:`read_results`."""
    scores: dict[str, dict[str, Score]] = {}
    for row in read_results(folder):
        scores.setdefault(row["method"], {})[row["image"]] = Score(row["psnr"], row["ssim"])
    return scores


#: What two runs must share, in their ``benchmark.json``, to be compared: the same problem, measured the same way.
SAME_SETTINGS = ("task", "operator", "protocol", "operator_seeds")

#: What an image of one name must share in both runs (``benchmark.json``'s ``inputs``): the same file's content,
#: slice, scored size and operator draw.
SAME_INPUT = ("sha256", "slice", "size", "operator_seed")


def read_record(folder: Path) -> dict | None:
    """``folder``'s ``benchmark.json`` (what ``idm benchmark`` records of the run); ``None`` when it is absent,
    unreadable, or not a JSON object, as in runs without that record."""
    try:
        record = json.loads((folder / "benchmark.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recorded_setting(record: dict, key: str):
    """``record[key]`` as :func:`check_same_problem` compares it: runs recorded before the wrap-around of
    per-image operator seeds was written out say ``"S + image index"`` for what newer runs record as
    ``"S + image index (mod 2**32)"``, the same seeds."""
    value = record.get(key)
    if key == "operator_seeds" and isinstance(value, str):
        return value.removesuffix(" (mod 2**32)")
    return value


def check_same_problem(base: Path, other: Path) -> None:
    """A ``ValueError`` naming the settings (:data:`SAME_SETTINGS`) in which the two runs' ``benchmark.json``
    differ, and the images of one name that are not the same image measured the same way (:data:`SAME_INPUT`).
    Runs without that record are not checked; runs that do not record their inputs (older ones) must have
    been resized alike (``resized_to``). Where both record each image's operator seed, those seeds are
    compared instead of the runs' base seeds: a run of one image given the seed of its index in a larger run
    (``--seed``) measured it as that run did, and pools with it."""
    records = [read_record(base), read_record(other)]
    if None in records:
        return
    inputs = [{item.get("name"): item for item in record.get("inputs") or []} for record in records]
    settings = SAME_SETTINGS
    if all(inputs) and all("operator_seed" in item for named in inputs for item in named.values()):
        settings = tuple(key for key in SAME_SETTINGS if key != "operator_seeds")  # compared image by image below
    differing = [key for key in settings if recorded_setting(records[0], key) != recorded_setting(records[1], key)]
    if not all(inputs) and records[0].get("resized_to") != records[1].get("resized_to"):
        differing.append("resized_to")
    shown = [f"{key}: {records[0].get(key)!r} against {records[1].get(key)!r}" for key in differing]
    if all(inputs):
        others = [name for name in inputs[0] if name in inputs[1]
                  and any(inputs[0][name].get(key) != inputs[1][name].get(key) for key in SAME_INPUT)]  # fmt: skip
        shown += [f"image {name!r}: {_describe_input(inputs[0][name])} against {_describe_input(inputs[1][name])}"
                  for name in others[:3]] + ([f"and {len(others) - 3} more images"] if len(others) > 3 else [])  # fmt: skip
    if shown:
        raise ValueError(f"{base} and {other} did not benchmark the same problem ({'; '.join(shown)})")
    for folder, record in zip((base, other), records):
        if record.get("complete") is False:  # the images it did not finish are left out of the comparison
            warnings.warn(f"{folder} is an incomplete run (stopped by {record.get('stopped_by', 'an error')}): "
                          "only the images both runs scored are compared", stacklevel=2)  # fmt: skip


def _describe_input(item: dict) -> str:
    """One image of a run's record, as a message shows it: file, slice, SHA-256 prefix, size, operator seed."""
    digest = item.get("sha256")
    return (f"{item.get('file')}" + (f" slice {item['slice']}" if item.get("slice") else "")
            + (f" (sha256 {digest[:12]})" if digest else "") + f", {'x'.join(map(str, item.get('size') or []))}"
            + f", operator seed {item.get('operator_seed')}")  # fmt: skip


def _comparable(scores: dict[str, Score]) -> dict[str, Score]:
    return {image: s for image, s in scores.items() if math.isfinite(s.psnr) and math.isfinite(s.ssim)}


def compare_runs(base: Path, other: Path, methods: Sequence[str] | None = None) -> list[dict]:
    """One row (:data:`FIELDS`) per method of the pair ``base``, ``other``; a ``ValueError`` when nothing is comparable."""
    first, second = read_scores(base), read_scores(other)
    check_same_problem(base, other)
    shared = [m for m in first if m in second] if methods is None else list(dict.fromkeys(methods))
    absent = [m for m in shared if m not in first or m not in second]
    if absent:
        raise ValueError(f"method(s) {', '.join(absent)} not scored in both {base} and {other} "
                         f"(methods there: {', '.join(first) or 'none'}; {', '.join(second) or 'none'})")  # fmt: skip
    if not shared:
        raise ValueError(f"{base} and {other} have no method in common")
    rows = []
    for method in shared:
        a, b = _comparable(first[method]), _comparable(second[method])
        images = [image for image in a if image in b]
        if not images:
            raise ValueError(f"{base} and {other} scored no image in common with {method}")
        psnr_diff = {image: b[image].psnr - a[image].psnr for image in images}
        ssim_diff = [b[image].ssim - a[image].ssim for image in images]
        worst = max(images, key=lambda image: abs(psnr_diff[image]))
        rows.append({
            "base": str(base), "other": str(other), "method": method, "images": len(images),
            "base_psnr": statistics.fmean(a[i].psnr for i in images), "other_psnr": statistics.fmean(b[i].psnr for i in images),
            "mean_psnr_difference": statistics.fmean(psnr_diff.values()), "largest_psnr_difference": abs(psnr_diff[worst]),
            "largest_psnr_image": worst,
            "base_ssim": statistics.fmean(a[i].ssim for i in images), "other_ssim": statistics.fmean(b[i].ssim for i in images),
            "mean_ssim_difference": statistics.fmean(ssim_diff), "largest_ssim_difference": max(abs(d) for d in ssim_diff),
            "left_out": len(set(first[method]) | set(second[method])) - len(images),
        })  # fmt: skip
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table (PSNR in dB to 3 decimals, SSIM to 4)."""
    header = ["base", "other", "method", "images", "base PSNR / SSIM", "other PSNR / SSIM", "mean difference",
              "largest on one image", "largest SSIM difference", "left out"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            f"`{Path(r['base']).name}`", f"`{Path(r['other']).name}`", f"`{r['method']}`", str(r["images"]),
            f"{r['base_psnr']:.3f} / {r['base_ssim']:.4f}", f"{r['other_psnr']:.3f} / {r['other_ssim']:.4f}",
            f"{r['mean_psnr_difference']:+.3f} dB", f"{r['largest_psnr_difference']:.3f} dB ({r['largest_psnr_image']})",
            f"{r['largest_ssim_difference']:.4f}", str(r["left_out"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", metavar="BASE OTHER", help="pairs of idm benchmark --out folders")
    parser.add_argument("--methods", nargs="+", help="methods to compare (default: every method both runs scored)")
    parser.add_argument("--out", required=True, help="folder for comparison.csv and comparison.md")
    args = parser.parse_args(argv)
    if len(args.folders) % 2:
        parser.error(f"give the folders in pairs (BASE OTHER ...); got {len(args.folders)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a folder")
    pairs = [(Path(args.folders[i]), Path(args.folders[i + 1])) for i in range(0, len(args.folders), 2)]
    rows = [row for base, other in pairs for row in compare_runs(base, other, args.methods)]
    markdown = f"`{script_command('benchmarks.compare', argv)}`\n\n{markdown_table(rows)}\n"
    write_csv_and_markdown(out, "comparison", rounded(rows), FIELDS, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.compare"))
