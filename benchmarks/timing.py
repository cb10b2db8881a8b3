"""What the timing scripts (``benchmarks.memory``, ``benchmarks.speed``) share: options, clocks, the training problem."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from idm import IDM
from idm.cpu_memory import keep_freed_memory
from idm.precision import autocast_for
from idm.training.optimizer import fused_by_default


def add_timing_args(parser: argparse.ArgumentParser, default_out: str, iters: int = 5, warmup: int = 2) -> None:
    """``--device --seed --out --iters --warmup --malloc``."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--iters", type=int, default=iters, help="timed iterations per configuration")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed iterations first")
    parser.add_argument("--malloc", choices=("kept", "glibc"), default="kept",
                        help="on the CPU: keep freed memory for reuse, as idm's commands do (idm.cpu_memory; "
                             "default), or glibc's own behaviour, for comparison")  # fmt: skip


def setup(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """Seed torch, set ``--malloc`` for a CPU run, return ``(device, out folder)`` (created)."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cpu" and args.malloc == "kept":
        keep_freed_memory()
    out = Path(args.out)
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


@dataclass
class TrainingSetup:
    """One benchmark training problem: an IDM in training mode, Adam as ``idm train`` makes it, images
    ``x`` ``(B, C, size, size)`` in ``[0, 1]``, their measurements ``y = A x``, and the autocast precision."""

    model: IDM
    optimizer: torch.optim.Optimizer
    op: Any
    x: torch.Tensor
    y: torch.Tensor
    precision: str

    @classmethod
    def for_model(cls, model: IDM, op: Any, batch: int, size: int, precision: str, lr: float) -> "TrainingSetup":
        """``model`` (on its device, set to training mode) on ``batch`` random images of ``size x size``."""
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused_by_default(model.parameters()))  # as idm train
        device = next(model.parameters()).device
        x = torch.rand(batch, model.config.image_channels, size, size, device=device)
        return cls(model, optimizer, op, x, op.A(x), precision)

    def forward(self) -> torch.Tensor:
        """The training forward, under the autocast of ``precision``."""
        with autocast_for(self.x.device.type, self.precision):
            return self.model(self.y, self.op)

    def iteration(self) -> None:
        """Forward, L1 loss, backward, Adam step."""
        self.optimizer.zero_grad(set_to_none=True)
        (self.forward().float() - self.x).abs().mean().backward()
        self.optimizer.step()
