"""Run reconstruction methods on the same images, operators and prior; time and score them.

    rows = run_benchmark(images, methods, operator_for, score, device, out_dir)

For image ``i`` the harness pads it to the protocol's multiple (CS: the
block, as the IDM authors), draws the operator ``operator_for(i, (H, W))``
(seeded per image, so a rerun is identical), measures ``y = A x`` once, and
gives every method the same ``y`` and operator with a generator seeded
``seed + i``. Each method's wall time is synchronised on CUDA, its peak
memory read (allocated on CUDA, resident on a Linux CPU), its reconstruction cropped back and scored with
``score(x_hat, x)``. A method that fails on an image is recorded with its
error and the run goes on.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks.report import save_grid, save_image
from benchmarks.resident_memory import ResidentPeak, measured_on
from idm.checkpoint import file_sha256
from tasks.data import check_size, resize_square
from tasks.measurements import unique_names

#: Columns of ``results.csv`` (``peak_mem_mb``: the method's own peak memory, see :func:`_timed_call`; on CUDA,
#: and on a CPU where :func:`benchmarks.resident_memory.measured_on`).
RESULT_FIELDS = ("method", "image", "psnr", "ssim", "seconds", "nfe", "peak_mem_mb", "status", "error")


@dataclass(frozen=True)
class BenchmarkImage:
    """A ground-truth image ``x`` ``(C, H, W)`` in the task's range ([0, 1]; complex MRI images: [-1, 1]), its
    name, and where it was read: ``file``, ``slice`` (its index in a volume, 0 for a single image) and ``sha256``
    (of the file's bytes); ``None`` for a dataset that does not say."""

    name: str
    x: Tensor
    file: str | None = None
    slice: int | None = None
    sha256: str | None = None

    def record(self) -> dict[str, Any]:
        """What identifies the image in a run's record: name, file, slice, SHA-256 and ``[H, W]`` as scored."""
        return {"name": self.name, "file": self.file, "slice": self.slice, "sha256": self.sha256,
                "size": list(self.x.shape[-2:])}  # fmt: skip


def load_images(
    task: Any, paths: Sequence[str], limit: int | None = None, seed: int = 0, size: int | None = None
) -> list[BenchmarkImage]:
    """The first ``limit`` (default: all) images of ``paths`` in the task's format.

    ``size``: resize every image to ``size x size`` (anti-aliased bilinear,
    values kept in the task's range: :func:`tasks.data.resize_square`); the images must then be square. ``None`` keeps
    them at their own size.
    """
    check_size(size)
    dataset = task.dataset(list(paths), crop=None, augment=False, seed=seed)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    name_of = getattr(dataset, "item_name", lambda i: f"image_{i:03d}")
    names = unique_names(name_of(i) for i in range(count))  # same file name in two folders: rows and PNGs apart
    source_of = getattr(dataset, "item_source", None)
    digests: dict[Path, str] = {}  # a volume's slices share their file
    images = []
    for i, name in enumerate(names):
        x = dataset[i]
        if size is not None:
            x = resize_square(x, size, name, complex_pairs=task.complex_images)
        if source_of is None:
            images.append(BenchmarkImage(name, x))
            continue
        path, index = source_of(i)
        if path not in digests:
            digests[path] = file_sha256(path)
        images.append(BenchmarkImage(name, x, str(path), int(index), digests[path]))
    return images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(method: Any, y: Tensor, op: Any, device: torch.device, seed: int,
                cpu_memory: bool) -> tuple[Tensor, float, float | None]:  # fmt: skip
    """``method(y, op)`` with a generator seeded ``seed``: ``(x_hat, seconds, peak MiB or None)``.

    The peak is the method's own memory: on CUDA its peak allocation above what is allocated before the call
    (the loaded models' weights left out); on the CPU with ``cpu_memory``, the pages it first touches
    (:mod:`benchmarks.resident_memory`). A fast method (``warm_up``: IDM, ``pinv``) is measured on the CPU by
    an untimed call of its own after the timed one, whose time then stays what it is without measuring (the
    heap the measuring call gave back is refilled by it, for the next image's timed call); a slow one by its
    timed call, which then pays for faulting its pages in (negligible beside its seconds).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    fast = getattr(method, "warm_up", False)
    timed = ResidentPeak() if cpu_memory and not fast else None
    _sync(device)
    with timed if timed is not None else nullcontext():
        start = time.perf_counter()
        x_hat = method(y, op, generator=torch.Generator(device).manual_seed(seed))
        _sync(device)
        seconds = time.perf_counter() - start
    if device.type == "cuda":
        return x_hat, seconds, (torch.cuda.max_memory_allocated(device) - allocated_before) / 2**20
    if not cpu_memory:
        return x_hat, seconds, None
    if timed is not None:
        return x_hat, seconds, timed.mib
    with ResidentPeak() as untimed:
        method(y, op, generator=torch.Generator(device).manual_seed(seed))
    return x_hat, seconds, untimed.mib


def _pad(x: Tensor, multiple: int | None) -> Tensor:
    if not multiple:
        return x
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, (-w) % multiple, 0, (-h) % multiple))


def run_benchmark(
    images: Sequence[BenchmarkImage],
    methods: Sequence[Any],
    operator_for: Callable[[int, tuple[int, int]], Any],
    score: Callable[[Tensor, Tensor], tuple[float, float]],
    display: Callable[[Tensor], Tensor],
    device: torch.device,
    out: Path | None = None,
    seed: int = 0,
    pad_multiple: int | None = None,
    progress: bool = True,
    after_image: Callable[[list[dict[str, Any]]], None] | None = None,
    measure_memory: bool = True,
) -> list[dict[str, Any]]:
    """Reconstruct every image with every method; returns one row per (method, image).

    Args:
        images: ground truths.
        methods: objects with ``name``, ``nfe`` and ``__call__(y, op, generator)``.
        operator_for: ``(image index, (H, W)) -> operator`` (seeded per image).
        score: ``(x_hat, x) -> (psnr, ssim)`` on ``(1, C, H, W)`` tensors, the protocol's metrics.
        display: ``(1, C, H, W) -> (1, C', H, W)`` image shown in pictures (e.g. MRI magnitude).
        device: where everything runs.
        out: folder for reconstructions (``recon/<method>/<image>.png``) and
            comparison grids (``grids/<image>.png``); ``None`` saves none.
        seed: generators of image ``i`` are seeded ``seed + i``.
        pad_multiple: zero-pad images to this multiple before measuring (crop after).
        progress: a progress bar over images.
        after_image: called with the rows so far after each image (e.g. to write them, so that a run stopped
            part-way keeps its scores).
        measure_memory: read each method's peak memory (``peak_mem_mb``). On the CPU that costs fast
            methods a second, untimed call per image (below); ``False`` leaves the column empty there
            and saves it (``idm demo``, whose table shows no memory). CUDA's counters cost nothing and
            are always read.

    Methods whose ``warm_up`` attribute is true (IDM and ``pinv``: milliseconds
    to seconds per image) first run once, untimed, on the first image, so
    that one-off start-up costs (kernel selection, operator caches on the
    device) are not charged to the first image's time; where the CPU's memory
    is measured they also run untimed after every image's timed call
    (:func:`_timed_call`).
    """
    cpu_memory = measure_memory and measured_on(device)
    warm = [m for m in methods if getattr(m, "warm_up", False)]
    if warm and images:
        x = _pad(images[0].x[None].to(device), pad_multiple)
        op = operator_for(0, tuple(x.shape[-2:]))
        y = op.A(x)
        for method in warm:
            try:
                method(y, op, generator=torch.Generator(device).manual_seed(seed))
            except Exception:  # noqa: BLE001 -- the timed run below records the failure for each image
                pass
        _sync(device)
    rows: list[dict[str, Any]] = []
    for i, image in enumerate(tqdm(images, desc="images", disable=not progress)):
        x = image.x[None].to(device)
        height, width = x.shape[-2:]
        x_padded = _pad(x, pad_multiple)
        op = operator_for(i, tuple(x_padded.shape[-2:]))
        y = op.A(x_padded)
        shown = {"ground truth": display(x)}
        for method in methods:
            row = {"method": method.name, "image": image.name, "nfe": method.nfe}
            try:
                x_hat, row["seconds"], row["peak_mem_mb"] = _timed_call(method, y, op, device, seed + i, cpu_memory)
                x_hat = x_hat[..., :height, :width].detach()
                if not torch.isfinite(x_hat).all():
                    raise FloatingPointError("the reconstruction contains NaN or inf")
                row["psnr"], row["ssim"] = score(x_hat, x)
                row["status"] = "ok"
                shown[f"{method.name}\n{row['psnr']:.2f} dB / {row['ssim']:.4f}"] = display(x_hat)
                if out is not None:
                    save_image(display(x_hat), out / "recon" / method.name / f"{image.name}.png")
            except Exception as err:  # noqa: BLE001 -- one failure must not stop the benchmark
                row["status"] = "error"
                row["error"] = f"{type(err).__name__}: {err}"
                print(f"{method.name} failed on {image.name}: {row['error']}", file=sys.stderr)  # in results.csv too
            rows.append(row)
        if out is not None:
            save_grid(shown, out / "grids" / f"{image.name}.png", title=image.name)
        if after_image is not None:
            after_image(rows)
    return rows
