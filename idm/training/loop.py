"""The iteration loop shared by ``idm train`` and ``idm pretrain``.

It owns what both trainers do around a training step: the time budget
(``--max-minutes``: stop early enough to checkpoint and exit cleanly), the
log / validation / checkpoint cadence, the progress bar, a clean stop on
SIGTERM or Ctrl-C (finish the iteration, checkpoint, exit), a clear stop
when the loss becomes NaN or infinite (before a diverged model is
checkpointed over good ones), and keeping every decision identical on all
DDP ranks.

Iteration numbers: the step for index ``i`` (0-based) completes iteration
``i + 1``; checkpoints, log rows and ``--iters`` count completed iterations.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from idm.training import distributed
from idm.training.batches import loader_batches
from idm.training.csv_log import CsvLog
from idm.training.distributed import DistEnv
from idm.training.run_folder import checkpoint_name


@dataclass(frozen=True)
class Cadence:
    """Every how many iterations to checkpoint, log and validate (``val_every=0``: never).

    A checkpoint, a log row and (with a validation set) a validation also
    happen at the last iteration; a checkpoint and a log row when stopping early;
    a log row at every checkpoint and validation.
    """

    checkpoint_every: int = 1000
    log_every: int = 10
    val_every: int = 0

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0, got {self.val_every}")


class OutOfDeviceMemory(ValueError):
    """A training step did not fit in the accelerator's memory; the message says what to change."""


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite; no checkpoint is written from then on (the message says what to do)."""


def _diverged_message(loss: float, first: int, last: int, last_saved: int, checkpoints: Path | None, bf16: bool) -> str:
    """What to do after a loss of ``loss`` over iterations ``first..last``: ``--resume`` keeps the run's
    settings (its learning rate too), so a lower rate is a new run, which ``idm train`` can start from the
    last checkpoint (``--init-from``, in the folder ``checkpoints``; ``None``: a command without it).
    ``bf16``: whether bf16 autocast ran (advise ``--precision fp32`` then)."""
    message = f"the training loss is {loss} over iterations {first}..{last}: the run diverged. "
    lower = "a lower --lr" + (" (or in float32, --precision fp32)" if bf16 else "")
    if last_saved <= 0:
        return message + f"No checkpoint was written; start again with {lower}"
    start = "" if checkpoints is None else f" with --init-from {checkpoints / checkpoint_name(last_saved)}, or an earlier one,"
    return message + (
        f"No checkpoint was written after iteration {last_saved}. Its weights may already be on the way up (the loss "
        f"is checked every --log-every iterations): start a new run (another --out){start} {'and' if start else 'with'} {lower}; "
        "--resume would keep this run's settings"
    )


def _out_of_memory(iteration: int, batch: torch.Tensor, err: Exception) -> OutOfDeviceMemory:
    shape = "x".join(str(n) for n in batch.shape) if isinstance(batch, torch.Tensor) else "?"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OutOfDeviceMemory(
        f"out of device memory at iteration {iteration + 1} (this process's batch {shape}): lower --batch-size or "
        f"--crop, or free the GPU of other processes (idm train: without --no-recompute its backward needs "
        f"less memory); the latest checkpoint is intact and --resume continues from it. The device said: {first_line}"
    )


@dataclass(frozen=True)
class LoopResult:
    """How a chunk of training ended."""

    iteration: int  #: completed iterations (over the whole run)
    target: int  #: ``--iters``
    reason: str  #: "done", "time" (budget reached) or "signal" (SIGTERM / Ctrl-C)
    seconds: float  #: training seconds accumulated over all chunks
    chunk_seconds: float = 0.0  #: seconds of this call's loop
    chunk_iterations: int = 0  #: iterations done by this call

    @property
    def iterations_per_second(self) -> float:
        return self.chunk_iterations / self.chunk_seconds if self.chunk_seconds > 0 else 0.0

    @property
    def finished(self) -> bool:
        return self.iteration >= self.target


class GracefulStop:
    """Context manager: SIGTERM / first Ctrl-C set :attr:`requested` instead of killing the process.

    A second Ctrl-C raises ``KeyboardInterrupt`` as usual. (Python runs a handler between two operations, and
    signals that arrive during one long torch call are taken once: a second Ctrl-C counts only after the
    first was handled.) Handlers are only installed from the main thread and are restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def checkpoint_time_guess(module: torch.nn.Module, copies: int = 3, bytes_per_second: float = 100e6) -> float:
    """A pessimistic guess of a checkpoint's write time: ``copies`` times the parameter bytes at ``bytes_per_second``."""
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return 1.0 + copies * nbytes / bytes_per_second


def run_loop(
    *,
    start: int,
    stop: int,
    batches: Iterable[torch.Tensor],
    step: Callable[[int, torch.Tensor], torch.Tensor],
    lr_at: Callable[[int], float],
    save: Callable[[int, float], None],
    cadence: Cadence,
    env: DistEnv,
    device: torch.device,
    log: CsvLog | None = None,
    validate: Callable[[int], float] | None = None,
    deadline: float | None = None,
    seconds_before: float = 0.0,
    progress: bool = True,
    desc: str = "train",
    save_estimate: float = 0.0,
    checkpoints: Path | None = None,
    bf16: bool = False,
) -> LoopResult:
    """Run steps ``start .. stop - 1``; see the module docstring.

    Args:
        batches: yields this rank's batch for each step index, in order (a DataLoader's worker
            processes are shut down when the loop ends, after an error too: :func:`loader_batches`).
        step: ``step(i, batch)`` trains on one batch and returns the detached
            0-dim loss (may stay on the device; it is read only when logging).
        lr_at: base learning rate of step index ``i`` (for the log).
        save: ``save(iteration, seconds)`` writes a checkpoint; called on rank 0 only.
        validate: ``validate(iteration) -> PSNR``, called on rank 0 only.
        deadline: ``time.monotonic()`` value by which the chunk must have exited.
        seconds_before: training seconds of earlier chunks (for the log).
        save_estimate: seconds a checkpoint is expected to take before one
            has been timed (kept in reserve before the deadline).
        checkpoints, bf16: where ``save`` writes, when a new run can start from there (``idm train
            --init-from``), and whether the step runs under autocast: for the advice when the loss diverges.
    """
    from tqdm.auto import tqdm

    main = env.is_main
    t0 = time.monotonic()
    est_iter = 0.0
    est_save = save_estimate
    est_val = 0.0  # the longest validation so far (seconds)
    timed_saves: list[float] = []
    window_sum = torch.zeros((), dtype=torch.float64, device=device)
    window_n = 0
    completed = start
    window_first = start + 1  # the first iteration whose loss is in the window
    last_saved = start  # the iteration of the newest checkpoint (the resume point at the start)
    reason = "done"
    bar = tqdm(total=stop, initial=start, desc=desc, unit="it", dynamic_ncols=True, disable=not (progress and main))
    try:
        with loader_batches(batches) as batch_iterator, GracefulStop() as stopper:
            for i in range(start, stop):
                tick = time.monotonic()
                batch = next(batch_iterator)
                try:
                    loss = step(i, batch)
                except torch.OutOfMemoryError as err:
                    raise _out_of_memory(i, batch, err) from None
                window_sum += loss.detach().to(torch.float64)
                window_n += 1
                completed = i + 1
                est_iter = time.monotonic() - tick if i == start else 0.8 * est_iter + 0.2 * (time.monotonic() - tick)

                val_due = validate is not None and (
                    completed == stop or bool(cadence.val_every and completed % cadence.val_every == 0)
                )
                val_psnr = None
                if val_due and main:
                    tick_val = time.monotonic()
                    val_psnr = validate(completed)
                    est_val = max(est_val, time.monotonic() - tick_val)

                halt = False
                if completed < stop:
                    # keep an iteration, a checkpoint and a validation (the last iteration has both) in reserve
                    late = deadline is not None and time.monotonic() + est_iter + est_save + est_val > deadline
                    halt = distributed.any_rank(late or stopper.requested, env, device)
                    if halt:
                        reason = "signal" if stopper.requested else "time"
                final = halt or completed == stop
                do_save = final or completed % cadence.checkpoint_every == 0
                if final or do_save or val_due or completed % cadence.log_every == 0:  # same on every rank
                    total, count = distributed.all_reduce_sum([float(window_sum), float(window_n)], env, device)
                    mean_loss = total / max(count, 1.0)
                    if not math.isfinite(mean_loss):  # every rank sees the same mean: all stop together
                        raise TrainingDiverged(_diverged_message(mean_loss, window_first, completed, last_saved, checkpoints, bf16))
                    window_sum.zero_()
                    window_n = 0
                    window_first = completed + 1
                    seconds = seconds_before + time.monotonic() - t0
                    if main and log is not None:
                        log.append(iteration=completed, loss=mean_loss, lr=lr_at(i), val_psnr=val_psnr, seconds=round(seconds, 3))
                    bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{lr_at(i):.3g}", refresh=False)
                if do_save and main:
                    tick = time.monotonic()
                    save(completed, seconds_before + time.monotonic() - t0)
                    last_saved = completed
                    timed_saves.append(time.monotonic() - tick)
                    est_save = max(timed_saves)
                bar.update(1)
                if halt:
                    break
    finally:
        bar.close()
    elapsed = time.monotonic() - t0
    return LoopResult(completed, stop, reason, seconds_before + elapsed, elapsed, completed - start)
