"""Test-time self-ensembling of an IDM over flips and turns of the image, for any linear operator.

For each symmetry ``g`` of :data:`operators.dihedral.DIHEDRAL` (the first
``size``), the model reconstructs the flipped or turned image from the same
measurements through ``A_g = A T_g^{-1}`` (:class:`operators.dihedral.Transformed`);
the estimates, turned back, are averaged:

    x_hat = mean_g  T_g^{-1} model(y, A_g)

The measurements are never transformed, so this works for every operator
(block CS, masks, k-space, sinograms). It costs ``size`` reconstructions.
When every estimate satisfies ``A x = y`` (IDM's final projection with an
exact ``A^+``), so does their mean. Sizes 1, 2 and 4 keep the image's shape
(identity, flips, half turn); 8 adds the quarter turns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from operators.dihedral import DIHEDRAL, Transformed

#: The ensemble sizes offered: subgroups of the dihedral group (see :data:`operators.dihedral.DIHEDRAL`).
ENSEMBLE_SIZES = (1, 2, 4, 8)


def check_ensemble_size(size: Any) -> int:
    """``size`` as an int in :data:`ENSEMBLE_SIZES`, or a ``ValueError`` that lists them."""
    if isinstance(size, bool) or not isinstance(size, int) or size not in ENSEMBLE_SIZES:
        raise ValueError(f"the ensemble size must be one of {', '.join(map(str, ENSEMBLE_SIZES))} (the flips and turns "
                         f"of the image that form a group), got {size!r}")  # fmt: skip
    return size


def ensemble_reconstruct(model: torch.nn.Module, y: Tensor, op: Any, size: int = 8,
                         generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """The mean of ``size`` reconstructions of flipped/turned images, turned back (module docstring).

    Args:
        model: an :class:`idm.IDM` (or any ``model(y, op, generator=...)`` that returns images).
        y: measurements in ``op``'s layout.
        op: the linear operator of ``y``.
        size: how many symmetries (:data:`ENSEMBLE_SIZES`); 1 is ``model(y, op)`` itself.
        generator: random source of the model (``init="noise"``), used by each reconstruction in turn.

    Returns:
        ``(B, C, H, W)`` images, as ``model(y, op)`` returns them.
    """
    size = check_ensemble_size(size)
    if size == 1:
        return model(y, op, generator=generator)
    total = None
    for symmetry in DIHEDRAL[:size]:
        estimate = symmetry.invert(model(y, Transformed(op, symmetry), generator=generator))
        total = estimate if total is None else total + estimate
    return total / size
