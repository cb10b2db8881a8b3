"""Step learning-rate schedule: ``lr * gamma ** (number of milestones <= i)``, stateless.

The rate of step ``i`` is a pure function of ``i``, so nothing needs saving
for ``--resume`` and every rank agrees.
"""

from __future__ import annotations

from typing import Iterable

import torch


def step_lr(lr: float, gamma: float, milestones: Iterable[int], index: int) -> float:
    """Learning rate of step ``index`` (0-based): halved (``gamma``) after every milestone reached."""
    return lr * gamma ** sum(1 for m in milestones if index >= m)


def milestones_from_fractions(iters: int, fractions: Iterable[float]) -> tuple[int, ...]:
    """Milestones at fractions of the run (``0.2`` of 50000 -> 10000), sorted, at least 1."""
    return tuple(sorted({max(1, round(f * iters)) for f in fractions}))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every param group ``lr`` times its ``"lr_mult"`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
