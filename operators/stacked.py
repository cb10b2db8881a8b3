"""Several operators run as one, each on its own slice of the batch (a block-diagonal operator).

``Stacked([A_1, ..., A_M])`` measures images ``(M * B, C, H, W)`` by cutting
the batch into ``M`` equal slices of ``B`` and measuring slice ``i`` with
``A_i``; measurements ``(M * B, ...)`` are cut the same way for ``A^T`` and
``A^+``. So one network call can reconstruct ``M`` problems that share an
image shape, e.g. the flipped and turned copies of one problem in a
test-time ensemble (:mod:`idm.ensemble`):

    from operators.stacked import Stacked
    stack = Stacked([op_1, op_2])           # both measure (B, C, H, W) images
    y = torch.cat([y_1, y_2])               # (2 * B, ...)
    x = model(y, stack)                     # x[:B] reconstructs y_1 under op_1, x[B:] y_2 under op_2

The block-diagonal operator's adjoint and pseudo-inverse are the blocks' own,
so exactness of ``A^+`` (and being a fixed linear map) holds when it holds
for every block.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from deepinv.physics import LinearPhysics
from torch import nn

from .base import has_exact_pinv, has_linear_pinv


class Stacked(LinearPhysics):
    """``M`` linear operators, operator ``i`` on slice ``i`` of ``M`` equal slices of the batch (module docstring).

    Args:
        operators: the ``M >= 1`` operators (each with ``A``, ``A_adjoint`` and ``A_dagger``: an
            :class:`operators.Operator`, a deepinv ``LinearPhysics``, an :class:`operators.dihedral.Transformed`).
            They act on images of one shape; a tensor whose batch is not a multiple of ``M`` is refused.
    """

    def __init__(self, operators: Sequence[Any]):
        super().__init__()
        operators = list(operators)
        if not operators:
            raise ValueError("Stacked needs at least one operator")
        missing = sorted({name for op in operators for name in ("A", "A_adjoint", "A_dagger")
                          if not callable(getattr(op, name, None))})  # fmt: skip
        if missing:
            raise TypeError(f"Stacked needs linear operators with A, A_adjoint and A_dagger; one lacks {', '.join(missing)}")
        # as submodules where they are modules (so that .to() moves them), as Transformed holds its operator
        self.operators = nn.ModuleList(operators) if all(isinstance(op, nn.Module) for op in operators) else operators

    @property
    def exact_pinv(self) -> bool:
        return all(has_exact_pinv(op) for op in self.operators)

    @property
    def linear_pinv(self) -> bool:
        return all(has_linear_pinv(op) for op in self.operators)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the images, when every operator gives the same; an ``AttributeError`` when one does
        not give its own (as for a deepinv physics), a ``ValueError`` when they differ."""
        shapes = {tuple(op.image_shape) for op in self.operators}  # AttributeError from an operator without one
        if len(shapes) != 1:
            raise ValueError(f"Stacked operators act on images of different shapes: {sorted(shapes)}")
        return shapes.pop()

    @property
    def check_measurement(self) -> Callable[[torch.Tensor], None]:
        """Each operator's own check of its slice of ``y``; an ``AttributeError`` when one has none (a deepinv
        physics), so that callers treat the stack as they treat that operator."""
        checks = [getattr(op, "check_measurement", None) for op in self.operators]
        if not all(callable(check) for check in checks):
            raise AttributeError("an operator of the stack has no check_measurement")

        def check(y: torch.Tensor) -> None:
            for each, part in zip(checks, self._slices(y, "y")):
                each(part)

        return check

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.cat([op.A(part) for op, part in zip(self.operators, self._slices(x, "x"))])

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.cat([op.A_adjoint(part) for op, part in zip(self.operators, self._slices(y, "y"))])

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.cat([op.A_dagger(part) for op, part in zip(self.operators, self._slices(y, "y"))])

    def _slices(self, t: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
        """``t`` cut along its batch into one slice per operator; a ``ValueError`` naming ``t`` when it cannot be."""
        count = len(self.operators)
        if t.dim() == 0 or t.shape[0] % count:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not split into {count} equal slices of its batch, "
                             "one per stacked operator")  # fmt: skip
        return t.chunk(count)

    def extra_repr(self) -> str:
        return f"operators={len(self.operators)}"
