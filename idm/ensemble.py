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
(identity, flips, half turn); 8 adds the quarter turns. ``tall=True`` turns
an image wider than tall by a quarter first, in every member.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from operators import image_shape_of
from operators.dihedral import DIHEDRAL, Dihedral, Transformed

#: The ensemble sizes offered: subgroups of the dihedral group (see :data:`operators.dihedral.DIHEDRAL`).
ENSEMBLE_SIZES = (1, 2, 4, 8)
#: What ``tall=True`` turns a wide image by first: a quarter turn counter-clockwise.
QUARTER_TURN = Dihedral(1, False)


def check_ensemble_size(size: Any) -> int:
    """``size`` as an int in :data:`ENSEMBLE_SIZES`, or a ``ValueError`` that lists them."""
    if isinstance(size, bool) or not isinstance(size, int) or size not in ENSEMBLE_SIZES:
        raise ValueError(f"the ensemble size must be one of {', '.join(map(str, ENSEMBLE_SIZES))} (the flips and turns "
                         f"of the image that form a group), got {size!r}")  # fmt: skip
    return size


def ensemble_reconstruct(model: torch.nn.Module, y: Tensor, op: Any, size: int = 8,
                         generator: torch.Generator | None = None, tall: bool = False) -> Tensor:  # fmt: skip
    """The mean of ``size`` reconstructions of flipped/turned images, turned back (module docstring).

    Args:
        model: an :class:`idm.IDM` (or any ``model(y, op, generator=...)`` that returns images).
        y: measurements in ``op``'s layout.
        op: the linear operator of ``y``.
        size: how many symmetries (:data:`ENSEMBLE_SIZES`); 1 is ``model(y, op)`` itself.
        generator: random source of the model (``init="noise"``), used by each reconstruction in turn.
        tall: reconstruct images wider than tall turned a quarter, standing tall (every member turned
            so; with ``size=8`` the same members in another order). The shipped natural-image models
            gained 0.4-1.0 dB on sets of mostly wide images so (``benchmarks/RESULTS.md``, *Wide images
            turned tall*).

    Returns:
        ``(B, C, H, W)`` images, as ``model(y, op)`` returns them.
    """
    size = check_ensemble_size(size)
    symmetries = DIHEDRAL[:size]
    if tall and _is_wide(y, op):
        symmetries = tuple(g.after(QUARTER_TURN) for g in symmetries)
    if symmetries == DIHEDRAL[:1]:
        return model(y, op, generator=generator)
    total = None
    for symmetry in symmetries:
        estimate = symmetry.invert(model(y, Transformed(op, symmetry), generator=generator))
        total = estimate if total is None else total + estimate
    return total / size


def _is_wide(y: Tensor, op: Any) -> bool:
    """Whether ``op``'s images are wider than tall (:func:`operators.image_shape_of`)."""
    with torch.no_grad():
        height, width = image_shape_of(op, y)[-2:]
    return width > height
