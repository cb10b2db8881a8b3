"""An operator seen through a flip or quarter turn of its images: ``A_g = A T_g^{-1}``.

The eight symmetries of the square (the dihedral group D4) map an image
``(B, C, H, W)`` to a flipped or turned copy, ``T_g x``. If ``y = A x``, then
``y = A_g (T_g x)`` with ``A_g = A T_g^{-1}``: the same measurements are those
of the transformed image under a transformed operator. Because ``T_g`` is a
permutation of pixels (orthogonal), ``A_g^T = T_g A^T`` and
``A_g^+ = T_g A^+``, so every property of ``A`` (adjoint, exact
pseudo-inverse, a fixed linear ``A^+``) carries over. A reconstruction
network run on ``(y, A_g)`` therefore sees a flipped or turned problem and
returns an estimate of ``T_g x``; :mod:`idm.ensemble` averages
``T_g^{-1}`` of those estimates (test-time self-ensembling, for any linear
operator, since the measurements themselves are never transformed).

    from operators.dihedral import DIHEDRAL, Transformed
    op_g = Transformed(op, DIHEDRAL[1])      # measures the left-right flipped image as op measures the image
    x_g = model(y, op_g); x = DIHEDRAL[1].invert(x_g)   # the same y; x_g estimates the flipped image

:data:`DIHEDRAL` lists the group so that its first 2 and first 4 elements keep
the image's shape (flips and the half turn), and all 8 include the four that
exchange height and width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from deepinv.physics import LinearPhysics

from .base import has_exact_pinv, has_linear_pinv


@dataclass(frozen=True)
class Dihedral:
    """One symmetry of the square: ``quarter_turns`` counter-clockwise turns (0-3), then a left-right flip.

    Acts on the last two dimensions of any tensor, so on ``(B, C, H, W)`` images.
    """

    quarter_turns: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.quarter_turns not in (0, 1, 2, 3) or not isinstance(self.flip, bool):
            raise ValueError(f"a dihedral symmetry has 0-3 quarter turns and a bool flip, got {self.quarter_turns!r}, "
                             f"{self.flip!r}")  # fmt: skip

    @classmethod
    def from_index(cls, k: int) -> "Dihedral":
        """Element ``k`` (0..7) in the numbering of training augmentation: ``k % 4`` quarter turns, flipped for
        ``k >= 4`` (``tasks.data.transforms.dihedral``)."""
        return cls(k % 4, k >= 4)

    def after(self, other: "Dihedral") -> "Dihedral":
        """The symmetry that applies ``other``, then this one: ``g.after(h).apply(x) == g.apply(h.apply(x))``."""
        probe = torch.arange(9.0).reshape(3, 3)  # distinct values: each symmetry moves them its own way
        target = self.apply(other.apply(probe))
        return next(g for g in DIHEDRAL if torch.equal(g.apply(probe), target))

    @property
    def swaps_height_and_width(self) -> bool:
        """Whether ``apply`` turns an ``H x W`` image into a ``W x H`` one."""
        return self.quarter_turns % 2 == 1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``T_g x``: ``x`` turned, then flipped (a new tensor)."""
        turned = torch.rot90(x, self.quarter_turns, dims=(-2, -1))
        return torch.flip(turned, dims=(-1,)) if self.flip else turned

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """``T_g^{-1} x``: undoes :meth:`apply` (also its adjoint, ``T_g`` being a permutation)."""
        unflipped = torch.flip(x, dims=(-1,)) if self.flip else x
        return torch.rot90(unflipped, -self.quarter_turns, dims=(-2, -1))

    def __str__(self) -> str:
        turns = f"{90 * self.quarter_turns} degree turn" if self.quarter_turns else ""
        return " + ".join(part for part in (turns, "flip" if self.flip else "") if part) or "identity"


#: The dihedral group D4, ordered so that the first 1, 2 and 4 elements are subgroups that keep the image
#: shape (identity; left-right flip; both flips and the half turn) and all 8 add the quarter turns.
DIHEDRAL: tuple[Dihedral, ...] = (
    Dihedral(0, False),
    Dihedral(0, True),
    Dihedral(2, False),
    Dihedral(2, True),
    Dihedral(1, False),
    Dihedral(1, True),
    Dihedral(3, False),
    Dihedral(3, True),
)


class Transformed(LinearPhysics):
    """``A_g = A T_g^{-1}`` for a linear operator ``A`` and a symmetry ``g`` (module docstring).

    Args:
        operator: any linear operator with ``A``, ``A_adjoint`` and ``A_dagger`` (an
            :class:`operators.Operator` or a deepinv ``LinearPhysics``); its measurements are
            this operator's measurements, unchanged.
        symmetry: the :class:`Dihedral` element ``g``.

    Images are ``(B, C, H', W')`` with ``(H', W')`` the operator's ``(H, W)``, exchanged when
    ``symmetry`` turns by a quarter. ``exact_pinv``, ``linear_pinv`` and measurement checks are the
    operator's.
    """

    def __init__(self, operator: Any, symmetry: Dihedral):
        super().__init__()
        if not isinstance(symmetry, Dihedral):
            raise TypeError(f"symmetry must be an operators.dihedral.Dihedral, got {type(symmetry).__name__}")
        self.operator = operator
        self.symmetry = symmetry

    @property
    def exact_pinv(self) -> bool:
        return has_exact_pinv(self.operator)

    @property
    def linear_pinv(self) -> bool:
        return has_linear_pinv(self.operator)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H', W')`` of the transformed images; an ``AttributeError`` when the operator does not say its own."""
        shape = getattr(self.operator, "image_shape", None)
        if shape is None:
            raise AttributeError(f"{type(self.operator).__name__} does not give its image_shape")
        channels, height, width = shape
        return (channels, width, height) if self.symmetry.swaps_height_and_width else (channels, height, width)

    @property
    def label(self) -> str:
        return f"{getattr(self.operator, 'label', type(self.operator).__name__)} ({self.symmetry})"

    @property
    def check_measurement(self) -> Callable[..., None]:
        """The operator's own check of ``y`` (the measurements are its measurements); an ``AttributeError``
        when it has none (a deepinv physics), so that callers treat this one as they treat that operator."""
        check = getattr(self.operator, "check_measurement", None)
        if not callable(check):
            raise AttributeError(f"{type(self.operator).__name__} has no check_measurement")
        return check

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.operator.A(self.symmetry.invert(x))

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.symmetry.apply(self.operator.A_adjoint(y))

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.symmetry.apply(self.operator.A_dagger(y))

    def extra_repr(self) -> str:
        return f"symmetry={self.symmetry}"
