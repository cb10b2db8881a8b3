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

Members whose images have the same shape run in one call of the model on a
GPU, stacked along the batch (:class:`operators.stacked.Stacked`): the same
reconstructions, with the model's work in larger batches, which a GPU runs
faster, for that many times the activation memory (members that do not fit
together, or fail together, run again one at a time). Elsewhere they run
one at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from operators import image_shape_of
from operators.dihedral import DIHEDRAL, Dihedral, Transformed
from operators.stacked import Stacked

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
                         generator: torch.Generator | None = None, tall: bool = False,
                         members_per_call: int | None = None) -> Tensor:  # fmt: skip
    """The mean of ``size`` reconstructions of flipped/turned images, turned back (module docstring).

    Args:
        model: an :class:`idm.IDM` (or any ``model(y, op, generator=...)`` that returns images).
        y: measurements in ``op``'s layout, batch first.
        op: the linear operator of ``y``.
        size: how many symmetries (:data:`ENSEMBLE_SIZES`); 1 is ``model(y, op)`` itself.
        generator: random source of the model (``init="noise"``), used by each call in turn.
        tall: reconstruct images wider than tall turned a quarter, standing tall (every member turned
            so; with ``size=8`` the same members in another order). The shipped natural-image models
            gained 0.3-1.0 dB on sets of mostly wide images so (``benchmarks/RESULTS.md``, *Wide images
            turned tall*).
        members_per_call: how many members of one image shape run in one call of the model, stacked along
            the batch (at most 4 are of one shape); default: 4 on a GPU, 1 elsewhere
            (:func:`default_members_per_call`). The result is the same up to rounding (which CT's
            conjugate-gradient final projection amplifies, as it does between a batch of images and the
            same images one at a time), but for a model that starts from noise, which then draws it for
            the stacked batch at once. Stacked members whose call fails (out of GPU memory, or bad input)
            run again one at a time, so errors name ``y`` as the plain model does; a model that draws
            noise has then drawn it twice.

    Returns:
        ``(B, C, H, W)`` images, as ``model(y, op)`` returns them.
    """
    size = check_ensemble_size(size)
    if members_per_call is None:  # y not a tensor: the model's own check says so, below
        members_per_call = default_members_per_call(getattr(y, "device", torch.device("cpu")))
    if isinstance(members_per_call, bool) or not isinstance(members_per_call, int) or members_per_call < 1:
        raise ValueError(f"members_per_call must be a positive int, got {members_per_call!r}")
    symmetries = DIHEDRAL[:size]
    if tall and _is_wide(y, op):
        symmetries = tuple(g.after(QUARTER_TURN) for g in symmetries)
    if symmetries == DIHEDRAL[:1]:
        return model(y, op, generator=generator)
    total = None
    for group in _calls(symmetries, members_per_call):
        for symmetry, estimate in zip(group, _reconstruct_members(model, y, op, group, generator)):
            estimate = symmetry.invert(estimate)
            total = estimate if total is None else total + estimate
    return total / size


def default_members_per_call(device: torch.device) -> int:
    """How many ensemble members of one shape :func:`ensemble_reconstruct` stacks into one call by default: 4 (all)
    on a GPU, which runs the shipped models' batch-1 calls far from busy (on an H200, 60.6 ms per 256x256 image
    alone against 4.2 ms in a batch of 16: ``benchmarks/results/h200/speed-small``), 1 on the CPU, where a
    batch of 4 took 5-13 % longer per image than single images, for more memory (``benchmarks/SPEED.md``)."""
    return 4 if device.type == "cuda" else 1


def _reconstruct_members(model: Any, y: Tensor, op: Any, group: tuple[Dihedral, ...],
                         generator: torch.Generator | None) -> list[Tensor]:  # fmt: skip
    """``model``'s estimates of the images transformed by each symmetry of ``group`` (one image shape), not yet
    turned back: in one call when the group has several; one at a time when that call fails, out of GPU memory
    or on input the model refuses (whose error then names ``y``'s own shape, not the stacked batch's)."""
    if len(group) > 1:
        try:
            stacked = Stacked([Transformed(op, symmetry) for symmetry in group])
            return list(model(torch.cat([y] * len(group)), stacked, generator=generator).chunk(len(group)))
        except (torch.OutOfMemoryError, ValueError, TypeError, RuntimeError):
            pass  # the failed call's tensors are freed once this handler ends (its traceback holds them until then)
        if isinstance(y, Tensor) and y.device.type == "cuda":
            torch.cuda.empty_cache()
    return [model(y, Transformed(op, symmetry), generator=generator) for symmetry in group]


def _calls(symmetries: tuple[Dihedral, ...], members_per_call: int) -> list[tuple[Dihedral, ...]]:
    """``symmetries`` in order, cut into runs of at most ``members_per_call`` that give images of one shape."""
    calls: list[list[Dihedral]] = []
    for symmetry in symmetries:
        last = calls[-1] if calls else None
        if last and len(last) < members_per_call and last[0].swaps_height_and_width == symmetry.swaps_height_and_width:
            last.append(symmetry)
        else:
            calls.append([symmetry])
    return [tuple(call) for call in calls]


def _is_wide(y: Tensor, op: Any) -> bool:
    """Whether ``op``'s images are wider than tall (:func:`operators.image_shape_of`)."""
    with torch.no_grad():
        height, width = image_shape_of(op, y)[-2:]
    return width > height
