"""What a benchmark writes: ``results.csv``, ``summary.md``, reconstructions and comparison grids."""

from __future__ import annotations

import csv
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from torch import Tensor

from idm.checkpoint import atomic_write


def _to_uint8(image: Tensor) -> np.ndarray:
    """``(1, C, H, W)`` in [0, 1] -> ``(H, W)`` or ``(H, W, 3)`` uint8 (clamped)."""
    x = image[0].detach().float().clamp(0, 1).cpu()
    if x.shape[0] == 1:
        x = x[0]
    elif x.shape[0] == 3:
        x = x.permute(1, 2, 0)
    else:
        raise ValueError(f"cannot show an image of {x.shape[0]} channels")
    return (x.numpy() * 255 + 0.5).astype(np.uint8)


def save_image(image: Tensor, path: Path) -> None:
    """Write a ``(1, C, H, W)`` image in [0, 1] (C = 1 or 3) as an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_uint8(image)).save(path)


def save_grid(images: Mapping[str, Tensor], path: Path, title: str = "") -> None:
    """One row of labelled ``(1, C, H, W)`` images, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.4), squeeze=False)
    for ax, (label, image) in zip(axes[0], images.items()):
        pixels = _to_uint8(image)
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results_csv(rows: Iterable[Mapping[str, Any]], path: Path, fields: Sequence[str]) -> None:
    """One row per (method, image); floats with 4 decimals (seconds with 4 significant digits). Written
    atomically: a run stopped while it writes keeps the previous version."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if k == "seconds" else f"{v:.4f}") if isinstance(v, float) else v
                                 for k, v in row.items()})  # fmt: skip

    atomic_write(path, write)


def script_command(module: str, argv: Sequence[str] | None) -> str:
    """``python -m MODULE ARGS``: how a benchmark script was run (``argv`` as given to its ``main``, else
    ``sys.argv[1:]``; shell-quoted, so the line can be pasted back)."""
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def run_script(main: Callable[[Sequence[str] | None], int], module: str, argv: Sequence[str] | None = None) -> int:
    """``main(argv)`` of the script ``python -m MODULE``, its errors reported as ``idm``'s commands report
    theirs (:func:`idm.cli.common.run_guarded`)."""
    from idm.cli.common import run_guarded

    return run_guarded(lambda: main(argv), f"python -m {module}")


def rounded(rows: Iterable[Mapping[str, Any]], digits: int = 6) -> list[dict[str, Any]]:
    """``rows`` with every float value rounded to ``digits`` decimals (what the scripts' CSV files hold)."""
    return [{k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def write_csv(out: Path, stem: str, rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> None:
    """``OUT/STEM.csv``: ``rows`` as they are, in the columns ``fields`` (rewritten whole: also for the rows so far)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_csv_and_markdown(out: Path, stem: str, rows: Iterable[Mapping[str, Any]], fields: Sequence[str], markdown: str) -> None:
    """``OUT/STEM.csv`` (``rows`` as they are, in the columns ``fields``) and ``OUT/STEM.md`` (``markdown``); prints the latter."""
    write_csv(out, stem, rows, fields)
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def _mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def _scored(row: Mapping[str, Any]) -> bool:
    """A row that counts in the means: reconstructed, with a finite PSNR and SSIM (an exact reconstruction's
    infinite PSNR has no mean)."""
    return row.get("status", "ok") == "ok" and math.isfinite(row["psnr"]) and math.isfinite(row["ssim"])


def summary_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> str:
    """Markdown: mean ± std of PSNR, SSIM and seconds, NFEs (and peak memory), per method, over the images that
    every method scored (:func:`_scored`), as the trade-off plot (:func:`benchmarks.tradeoff.method_points`)
    averages them: a method that fails on the hard images is not averaged over the easy ones only. A note
    under the table says when an image was left out."""
    with_memory = any(r.get("peak_mem_mb") is not None for r in rows)
    header = ["method", "PSNR (dB)", "SSIM", "seconds / image", "NFEs"] + (["peak MiB"] if with_memory else []) + ["images"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    scored: dict[str, dict[str, Mapping[str, Any]]] = {name: {} for name in methods}
    for r in rows:  # the first row of a method and image, as the trade-off plot takes it
        if r["method"] in scored and _scored(r):
            scored[r["method"]].setdefault(r["image"], r)
    sets = [set(images) for images in scored.values() if images]  # a method that scored nothing has no mean anyway
    common = sorted(set.intersection(*sets)) if sets else []
    for name in methods:
        picked = [scored[name][image] for image in common if image in scored[name]]
        failed = sum(1 for r in rows if r["method"] == name and r.get("status", "ok") != "ok")
        unscored = sum(1 for r in rows if r["method"] == name and r.get("status", "ok") == "ok" and not _scored(r))
        nfe = next((r["nfe"] for r in rows if r["method"] == name), "-")
        cells = [
            f"`{name}`",
            _mean_std([r["psnr"] for r in picked], 2),
            _mean_std([r["ssim"] for r in picked], 4),
            _mean_std([r["seconds"] for r in picked], 3),
            str(nfe),
        ]
        if with_memory:
            cells.append(_mean_std([r["peak_mem_mb"] for r in picked if r.get("peak_mem_mb") is not None], 0))
        notes = [f"{failed} failed"] * bool(failed) + [f"{unscored} with an infinite PSNR"] * bool(unscored)
        cells.append(f"{len(picked)}" + (f" ({', '.join(notes)})" if notes else ""))
        lines.append("| " + " | ".join(cells) + " |")
    every = {r["image"] for r in rows if r["method"] in methods}
    if len(common) < len(every):
        lines.append(f"\nMeans over the {len(common)} of {len(every)} images that every method scored (a method that "
                     "scored none aside): an image that a method failed on, or reconstructed exactly (an infinite PSNR), "
                     "is left out for all.")  # fmt: skip
    return "\n".join(lines)
