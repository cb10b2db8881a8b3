"""What the timing scripts (``benchmarks.memory``, ``benchmarks.speed``) share: options, clocks, the training problem."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import operators
from idm import IDM
from idm.cli.common import non_negative_int, positive_int, resolve_device, seed_value
from idm.cpu_memory import keep_freed_memory
from idm.precision import autocast_for
from idm.training.micro_batches import backward_in_micro_batches, check_micro_batch
from idm.training.optimizer import fused_by_default
from idm.unets import check_unet_source


def add_timing_args(parser: argparse.ArgumentParser, iters: int = 5, warmup: int = 2) -> None:
    """``--device --seed --out --iters --warmup --malloc`` (``--out`` required: a default folder would be one
    of the committed result folders, which a run would silently replace)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--iters", type=positive_int, default=iters, help="timed iterations per configuration")
    parser.add_argument("--warmup", type=non_negative_int, default=warmup, help="untimed iterations first")
    parser.add_argument("--malloc", choices=("kept", "glibc"), default="kept",
                        help="on the CPU: keep freed memory for reuse, as idm's commands do (idm.cpu_memory; "
                             "default), or glibc's own behaviour, for comparison")  # fmt: skip


def setup(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """Seed torch, set ``--malloc`` for a CPU run, return ``(device, out folder)`` (created, once ``--device``
    and any ``--unet`` are known to be usable: a refused run leaves no empty folder)."""
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)  # a clear error for a device this machine does not have
    if getattr(args, "unet", None):
        check_unet_source(args.unet)
    if device.type == "cpu" and args.malloc == "kept":
        keep_freed_memory()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return device, out


def sync(device: torch.device) -> None:
    """Wait for the GPU (a no-op on the CPU), so wall times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_page_faults(run: Callable[[], Any]) -> int:
    """Minor page faults of the process during one ``run()``: fresh pages the kernel zeroed and mapped.

    On the CPU, a steady-state forward that still faults in pages pays for
    them in system time (:mod:`idm.cpu_memory`). 0 where ``resource`` is
    missing (Windows).
    """
    try:
        import resource
    except ImportError:
        return 0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def seconds_of(run: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one ``run()`` (synchronised on CUDA)."""
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def median_seconds(run: Callable[[], Any], device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of ``run()`` over ``iters`` calls after ``warmup`` (synchronised on CUDA)."""
    return statistics.median([seconds_of(run, device) for _ in range(warmup + iters)][warmup:])


def first_cause(error: BaseException) -> BaseException:
    """The error a chain started from: a failed CUDA-graph capture raises a second error on leaving the capture
    ("operation failed due to a previous error during capture") whose context is the one that says why."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def error_line(error: BaseException, width: int = 160) -> str:
    """``"Type: first line"`` of :func:`first_cause` ``(error)``, at most ``width`` characters of the message."""
    cause = first_cause(error)
    return f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:width]}"


def require_cuda_for_graphs(device: torch.device) -> None:
    """A ``RuntimeError`` that the benchmarks record as a row's status, off CUDA."""
    if device.type != "cuda":
        raise RuntimeError(f"cudagraphs needs a CUDA device, not {device.type}")


def captured(run: Callable[[], Any], device: torch.device, warmup: Callable[[], Any] | None = None,
             before_capture: Callable[[], Any] | None = None) -> Callable[[], Any]:  # fmt: skip
    """``run`` captured as a CUDA graph: a callable that replays it (same inputs, same output tensors).

    The recipe of ``torch.cuda.graphs``: three warm-up calls (of ``warmup``, by
    default ``run`` itself) on a side stream, ``before_capture()``, one
    captured call of ``run``, then every call is one ``replay()`` (no Python,
    no kernel launches). Capture needs work that never reads a value back to
    the host: it runs inside :func:`operators.unchecked_values`, where the
    model's one read (the measurement NaN check) is skipped too.
    """
    require_cuda_for_graphs(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), operators.unchecked_values():
        for _ in range(3):
            (warmup or run)()
    torch.cuda.current_stream(device).wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), operators.unchecked_values():
        out = run()

    def replay() -> Any:
        graph.replay()
        return out

    return replay


@dataclass
class TrainingSetup:
    """One benchmark training problem: an IDM in training mode, Adam as ``idm train`` makes it, images
    ``x`` ``(B, C, size, size)`` in ``[0, 1]``, their measurements ``y = A x``, and the autocast precision.

    ``capturable``: Adam keeps its step counts on the device and autocast casts weights at every use
    (no weight cache), so that :meth:`captured_iteration` can capture the iteration as a CUDA graph.
    ``micro_batch``: the forward and backward run this many images at a time (``idm train --micro-batch``,
    :mod:`idm.training.micro_batches`); ``None``: the whole batch at once.
    """

    model: IDM
    optimizer: torch.optim.Optimizer
    op: Any
    x: torch.Tensor
    y: torch.Tensor
    precision: str
    capturable: bool = False
    micro_batch: int | None = None

    @classmethod
    def for_model(cls, model: IDM, op: Any, batch: int, size: int, precision: str, lr: float | torch.Tensor,
                  capturable: bool = False, micro_batch: int | None = None) -> "TrainingSetup":  # fmt: skip
        """``model`` (on its device, set to training mode) on ``batch`` random images of ``size x size``.

        ``lr`` may be a 0-dim tensor on the device with ``capturable``: a captured iteration reads it, so
        changing it in place changes the replays' rate."""
        model.train()
        fused = fused_by_default(model.parameters())  # as idm train
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused, capturable=capturable)
        device = next(model.parameters()).device
        x = torch.rand(batch, model.config.image_channels, size, size, device=device)
        return cls(model, optimizer, op, x, op.A(x), precision, capturable, check_micro_batch(micro_batch))

    def forward(self, rows: slice = slice(None)) -> torch.Tensor:
        """The training forward of the images ``rows``, under the autocast of ``precision``."""
        with autocast_for(self.x.device.type, self.precision, cache_enabled=not self.capturable):
            return self.model(self.y[rows], self.op)

    def step(self) -> None:
        """Forward, L1 loss, backward (in micro-batches), Adam step, adding to the gradients there are (none
        after ``zero_grad``)."""
        loss_of = lambda rows: (self.forward(rows).float() - self.x[rows]).abs().mean()  # noqa: E731
        backward_in_micro_batches(loss_of, self.x.shape[0], self.micro_batch)
        self.optimizer.step()

    def iteration(self) -> None:
        """Forward, L1 loss, backward, Adam step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step()

    def captured_iteration(self) -> Callable[[], None]:
        """The iteration captured as one CUDA graph (:func:`captured`): each call replays it, a full
        iteration without Python or kernel launches (for a setup made with ``capturable``).

        torch's whole-network recipe: warm-up iterations, then the gradients set to none and one
        :meth:`step` captured, whose backward writes the gradients afresh; replays reuse its tensors.
        """
        if not self.capturable:
            raise ValueError("capture needs a TrainingSetup made with capturable=True "
                             "(Adam's step on the device, no autocast cache)")
        return captured(self.step, self.x.device, warmup=self.iteration,
                        before_capture=lambda: self.optimizer.zero_grad(set_to_none=True))  # fmt: skip
