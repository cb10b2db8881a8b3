"""A trained :class:`idm.IDM` behind the benchmark's method interface."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from idm import IDM
from idm.ensemble import check_ensemble_size, ensemble_reconstruct


def idm_method_name(ensemble: int, tall: bool = False) -> str:
    """The label of IDM in tables: ``"idm"``, ``"idm-x8"`` for an ensemble of 8 (:mod:`idm.ensemble`), with
    ``-tall`` when wide images are reconstructed standing tall (``"idm-tall"``, ``"idm-x2-tall"``)."""
    return ("idm" if ensemble == 1 else f"idm-x{ensemble}") + ("-tall" if tall else "")


class IDMMethod:
    """``x_hat = model(y, op)``: T U-Net evaluations, no gradient; with ``ensemble`` > 1, the mean of that
    many reconstructions of flipped and turned images (:func:`idm.ensemble.ensemble_reconstruct`).

    Args:
        model: a trained IDM (e.g. ``idm.train.load_trained(path).model``), on its device; prepared in place
            with :meth:`idm.IDM.for_inference` (eval, no parameter gradients, channels-last on the CPU).
        name: the label in tables (default: :func:`idm_method_name`).
        precision: ``"fp32"`` or ``"bf16"`` (the U-Net under bfloat16 autocast, :mod:`idm.precision`).
        ensemble: 1, 2, 4 or 8 (:data:`idm.ensemble.ENSEMBLE_SIZES`).
        tall: reconstruct images wider than tall turned a quarter (:func:`idm.ensemble.ensemble_reconstruct`).
    """

    #: Cheap enough to run once untimed before the timed images (benchmarks.harness.run_benchmark).
    warm_up = True

    def __init__(self, model: IDM, name: str | None = None, precision: str = "fp32", ensemble: int = 1,
                 tall: bool = False):  # fmt: skip
        self.ensemble = check_ensemble_size(ensemble)
        self.tall = bool(tall)
        self.model = model.for_inference(precision=precision)
        self.name = idm_method_name(self.ensemble, self.tall) if name is None else name

    @property
    def nfe(self) -> int:
        """U-Net evaluations per image: one per sampling step and ensemble member."""
        return self.model.config.steps * self.ensemble

    @torch.no_grad()
    def __call__(self, y: Tensor, op: Any, generator: torch.Generator | None = None) -> Tensor:
        return ensemble_reconstruct(self.model, y, op, self.ensemble, generator=generator, tall=self.tall)
