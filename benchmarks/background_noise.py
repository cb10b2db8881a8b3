"""How much noise the corners of images hold: the background of scanner images against that of training images.

    python -m benchmarks.background_noise PATH [PATH ...] [--task mri] [--corner 32] [--limit N] --out FOLDER

Every ``PATH`` (an image, a ``.mat`` file, a fully sampled fastMRI ``.h5``
file, or a folder of them) is read as ``idm benchmark --data`` reads it, in
the task's format (for ``mri``: 2 channels, the real and imaginary parts; a
magnitude image is (magnitude, 0), a file's k-space gives its complex images
scaled by the largest magnitude in its volume). For each image, each of its four
``corner x corner`` corners (top-left, top-right, bottom-left,
bottom-right) and each channel it gives the standard deviation of the
values there, their largest absolute value and the fraction of exact zeros.
Where a corner is background, its standard deviation is the noise level in
the units of the images the network sees (a fraction of the largest
magnitude for MRI); a corner of exact zeros has none. ``--image-noise`` of
``idm train`` adds noise in the same units. Writes ``FOLDER/background_noise.csv``
(one row per image, corner and channel) and ``.md`` (per image and channel
the range over its corners) and prints the latter.

The corners are only background where the anatomy leaves them free: look at
the image (the ``.md`` gives every corner's largest value to tell).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

import tasks
from benchmarks.harness import load_images
from benchmarks.report import rounded, run_script, script_command, write_csv_and_markdown

#: The columns of ``background_noise.csv``: ``std`` and ``max_abs`` in the image's units, ``zero_fraction`` in [0, 1].
FIELDS = ("image", "corner", "channel", "std", "max_abs", "zero_fraction")

#: Names of the four corners, in the order :func:`corner_patches` returns them.
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def corner_patches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The four ``size x size`` corners of ``x`` ``(C, H, W)``, each ``(C, size, size)``, in :data:`CORNERS`'
    order; a ``ValueError`` when ``size`` is not a whole number in [2, min(H, W) // 2] (corners that overlap
    would count pixels twice)."""
    height, width = x.shape[-2:]
    if not 2 <= size <= min(height, width) // 2:
        raise ValueError(f"--corner must lie in [2, {min(height, width) // 2}] for a {height}x{width} image, got {size}")
    return [x[:, :size, :size], x[:, :size, -size:], x[:, -size:, :size], x[:, -size:, -size:]]


def corner_rows(name: str, x: torch.Tensor, size: int, channel_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row of :data:`FIELDS` per corner and channel of the image ``x`` ``(C, H, W)``."""
    rows = []
    for corner, patch in zip(CORNERS, corner_patches(x.double(), size)):
        for channel, values in zip(channel_names, patch):
            rows.append({
                "image": name, "corner": corner, "channel": channel, "std": float(values.std()),
                "max_abs": float(values.abs().max()), "zero_fraction": float((values == 0).double().mean()),
            })  # fmt: skip
    return rows


def channel_names(task: Any, channels: int) -> list[str]:
    """``real``/``imaginary`` for the 2 channels of MRI's complex images, else ``0``, ``1``, ..."""
    if task.name == "mri" and channels == 2:
        return ["real", "imaginary"]
    return [str(c) for c in range(channels)]


def markdown_table(rows: Sequence[dict[str, Any]], size: int) -> str:
    """Per image and channel: the range over its corners of the standard deviation and largest value, and
    the mean fraction of exact zeros."""
    lines = [
        f"Corners of {size}x{size} pixels; values in the images' own units (MRI: a fraction of the largest magnitude).",
        "",
        "| image | channel | std (min-max over the corners) | largest abs value (min-max) | exact zeros |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["image"], row["channel"]), []).append(row)
    for (image, channel), mine in groups.items():
        stds = [r["std"] for r in mine]
        peaks = [r["max_abs"] for r in mine]
        zeros = statistics.fmean(r["zero_fraction"] for r in mine)
        lines.append(f"| {image} | {channel} | {min(stds):.4f}-{max(stds):.4f} | {min(peaks):.4f}-{max(peaks):.4f} | {zeros:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.background_noise", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="images, .mat or fully sampled fastMRI .h5 files, or folders of them")
    parser.add_argument("--task", default="mri", help="the task whose format reads them (default: mri)")
    parser.add_argument("--corner", type=int, default=32, help="corner side in pixels (default 32)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--out", type=Path, required=True, help="where to write background_noise.csv/.md")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    task = tasks.get(args.task)
    rows = []
    for image in load_images(task, args.paths, limit=args.limit):
        rows.extend(corner_rows(image.name, image.x, args.corner, channel_names(task, image.x.shape[0])))
    markdown = f"`{script_command('benchmarks.background_noise', argv)}`\n\n{markdown_table(rows, args.corner)}"
    write_csv_and_markdown(args.out, "background_noise", rounded(rows), FIELDS, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.background_noise"))
