"""A trained :class:`idm.IDM` behind the benchmark's method interface."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from idm import IDM


class IDMMethod:
    """``x_hat = model(y, op)``: T U-Net evaluations, no gradient.

    Args:
        model: a trained IDM (e.g. ``idm.train.load_trained(path).model``), on its device; prepared in place
            with :meth:`idm.IDM.for_inference` (eval, no parameter gradients, channels-last on the CPU).
        name: the label in tables (``"idm"``).
        precision: ``"fp32"`` or ``"bf16"`` (the U-Net under bfloat16 autocast, :mod:`idm.precision`).
    """

    #: Cheap enough to run once untimed before the timed images (benchmarks.harness.run_benchmark).
    warm_up = True

    def __init__(self, model: IDM, name: str = "idm", precision: str = "fp32"):
        self.model = model.for_inference(precision=precision)
        self.name = name

    @property
    def nfe(self) -> int:
        """U-Net evaluations per image: one per sampling step."""
        return self.model.config.steps

    @torch.no_grad()
    def __call__(self, y: Tensor, op: Any, generator: torch.Generator | None = None) -> Tensor:
        return self.model(y, op, generator=generator)
