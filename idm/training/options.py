"""The options every training loop shares (``idm train`` and ``idm pretrain``) and their checks."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from idm.precision import PRECISION_CHOICES
from idm.training.micro_batches import check_micro_batch


@dataclass(frozen=True)
class LoopOptions:
    """Options of a training loop; :class:`idm.train.TrainConfig` and
    :class:`idm.pretrain.PretrainConfig` add their own (and their own defaults).

    Attributes:
        iters: total iterations of the run.
        batch_size: global batch ``B`` (a multiple of the number of processes).
        lr: Adam learning rate at the start.
        lr_gamma: learning-rate factor at each milestone.
        seed: seed of data order, crops, flips, operator draws and noise.
        precision: ``"auto"`` (bf16 autocast on CUDA, float32 on the CPU), ``"fp32"`` or ``"bf16"``
            (:func:`idm.precision.training_precision`; bf16 on a CPU with AMX trains 1.2-1.7x faster).
        augment: one of the 8 flips/rotations per global batch.
        checkpoint_every, log_every: cadences in iterations.
        keep: number of checkpoints kept.
        max_minutes: time budget of this command (checkpoint and exit before it).
        num_workers: DataLoader worker processes.
        progress: show a tqdm progress bar (rank 0).
        micro_batch: run each process's share of a batch in pieces of at most
            this many images, accumulating the gradients: the same update up to
            rounding, with the activations of fewer images held at once
            (:mod:`idm.training.micro_batches`); ``None``: all at once. How the
            step runs, not what it computes: a resumed run may change it.
    """

    iters: int = 20_000
    batch_size: int = 8
    lr: float = 1e-4
    lr_gamma: float = 0.5
    seed: int = 0
    precision: str = "auto"
    augment: bool = True
    checkpoint_every: int = 1000
    log_every: int = 10
    keep: int = 2
    max_minutes: float | None = None
    num_workers: int = 0
    progress: bool = True
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        check_loop_options(type(self).__name__, self)

    def need(self, ok: bool, message: str) -> None:
        """Raise ``ValueError("<class name>: message")`` unless ``ok``."""
        if not ok:
            raise ValueError(f"{type(self).__name__}: {message}")


def check_loop_options(owner: str, options: Any) -> None:
    """Raise ``ValueError("<owner>: ...")`` unless the shared fields of ``options`` make sense.

    Fields: ``iters``, ``batch_size``, ``lr``, ``lr_gamma``, ``seed``, ``keep``,
    ``num_workers``, ``precision``, ``max_minutes``, ``micro_batch``.
    """

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{owner}: {message}")

    need(options.iters >= 1, f"iters must be >= 1, got {options.iters}")
    need(options.batch_size >= 1, f"batch_size must be >= 1, got {options.batch_size}")
    need(options.lr > 0 and math.isfinite(options.lr), f"lr must be a positive number, got {options.lr}")
    need(0 < options.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {options.lr_gamma}")
    need(options.seed >= 0, f"seed must be >= 0, got {options.seed}")
    need(options.keep >= 1, f"keep must be >= 1, got {options.keep}")
    need(options.num_workers >= 0, f"num_workers must be >= 0, got {options.num_workers}")
    need(options.precision in PRECISION_CHOICES,
         f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {options.precision!r}")
    need(options.max_minutes is None or options.max_minutes > 0, f"max_minutes must be positive, got {options.max_minutes}")
    try:
        check_micro_batch(options.micro_batch)
    except ValueError as error:
        need(False, str(error))


def recorded_training_identity(training: dict[str, Any]) -> dict[str, Any]:
    """A saved run's training identity as this version records it: runs from before ``precision`` recorded
    ``"amp": true`` (bf16 autocast on CUDA, float32 on the CPU: ``"auto"``) or ``false`` (``"fp32"``)."""
    if "amp" not in training or "precision" in training:
        return training
    rest = {k: v for k, v in training.items() if k != "amp"}
    return {**rest, "precision": "auto" if training["amp"] else "fp32"}


def recorded_run_identity(run: dict[str, Any]) -> dict[str, Any]:
    """A saved run config's ``identity``, its ``training`` part as this version records it
    (:func:`recorded_training_identity`)."""
    identity = run.get("identity", {})
    training = identity.get("training") if isinstance(identity, dict) else None
    if isinstance(training, dict):
        identity = {**identity, "training": recorded_training_identity(training)}
    return identity


def warn_if_arithmetic_changed(resumed_run: dict[str, Any] | None, arithmetic: str) -> None:
    """Warn when a resumed chunk trains in another arithmetic than the checkpoint's run recorded
    (``settings.arithmetic``): ``--precision auto`` resolves by device, so a run moved between CUDA and the
    CPU changes arithmetic with it (an explicit precision is part of the run's identity and never changes)."""
    settings = (resumed_run or {}).get("settings")
    recorded = settings.get("arithmetic") if isinstance(settings, dict) else None
    if recorded and recorded != arithmetic:
        warnings.warn(f"this chunk trains in {arithmetic}, the chunk before it in {recorded}: with --precision auto the "
                      "arithmetic follows the device (bf16 on CUDA, fp32 on the CPU); resume on the chunk before's "
                      "device to keep it", stacklevel=2)  # fmt: skip


#: What ``--resume`` adds when a run's precision differs (``RESUME_HINTS`` of ``idm train`` and ``idm pretrain``).
PRECISION_RESUME_HINT = "(resume with the run's --precision; another arithmetic is a new run: --init-from for idm train)"
