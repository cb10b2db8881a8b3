"""Least-squares ``A^+`` by conjugate gradients, for operators whose ``A_dagger`` is approximate.

    x = least_squares_solve(op, y, max_iter=20)   # argmin ||A x - y||, from x = 0
    exact = LeastSquaresInverse(op, max_iter=20)  # op, with that solve as its A_dagger

CG on the normal equations ``A^T A x = A^T y``, started from ``x = 0``,
stays in the range of ``A^T``, so it converges to the minimum-norm least
squares solution: the pseudo-inverse ``A^+ y``, for any linear operator that
supplies ``A`` and ``A_adjoint``. After ``max_iter`` steps it is an
approximation whose residual ``||A x - y||`` falls with every step.

CT uses it for ``pinv="cg"`` and DDNM's projection for operators whose
``exact_pinv`` is false (CT's filtered back-projection), so both solve the
same way.

deepinv's ``conjugate_gradient`` does the iterations. Its default breakdown
guard (``eps=1e-8`` on ``p^T A^T A p``) stops CG early on operators of unit
norm, once the search direction is small (20 steps on 60-view CT: relative
residual 0.0021 instead of 0.00095), so it is set to ``1e-30`` here.
"""

from __future__ import annotations

from typing import Any

import torch
from deepinv.physics import LinearPhysics

from .base import check_positive_int


def least_squares_solve(op: Any, y: torch.Tensor, max_iter: int = 20, tol: float = 1e-6) -> torch.Tensor:
    """Minimum-norm least squares solution of ``A x = y`` by ``max_iter`` CG steps at most.

    Args:
        op: any linear operator with ``A`` and ``A_adjoint`` (a deepinv ``LinearPhysics``).
        y: measurements in ``op``'s measurement shape, batch first.
        max_iter: CG steps at most (the cost: two operator applications each).
        tol: stop early once the normal-equation residual, relative to
            ``||A^T y||``, is below it (per batch item).

    Returns:
        ``x`` in ``op``'s image shape, ``y``'s device and dtype.
    """
    from deepinv.optim.linear import conjugate_gradient

    return conjugate_gradient(
        lambda v: op.A_adjoint(op.A(v)),
        op.A_adjoint(y),
        max_iter=max_iter,
        tol=tol,
        eps=1e-30,  # see module docstring: deepinv's 1e-8 stalls CG on operators of unit norm
        parallel_dim=[0],
    )


class LeastSquaresInverse(LinearPhysics):
    """``op`` with :func:`least_squares_solve` as its ``A_dagger``; ``A`` and ``A_adjoint`` are ``op``'s.

    Args:
        op: any linear operator with ``A`` and ``A_adjoint``.
        max_iter: CG steps per ``A_dagger`` call (positive integer).
        tol: relative residual at which CG stops early.
    """

    def __init__(self, op: Any, max_iter: int = 20, tol: float = 1e-6):
        super().__init__()
        self.op = op
        self.max_iter = check_positive_int(max_iter, "max_iter")
        self.tol = float(tol)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.op.A(x, **kwargs)

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.op.A_adjoint(y, **kwargs)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return least_squares_solve(self.op, y, max_iter=self.max_iter, tol=self.tol)

    def extra_repr(self) -> str:
        return f"max_iter={self.max_iter}, tol={self.tol}"
