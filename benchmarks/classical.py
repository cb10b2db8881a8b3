"""``tv``: total-variation regularised least squares, the classical model-based baseline.

Solves, per image and per channel (isotropic TV on each channel; for MRI the
real and imaginary channels separately)::

    min_x  1/2 ||A x - y||^2 + lam * TV(x)

with deepinv's proximal gradient descent (``deepinv.optim.PGD``, the 0.5 API
behind ``optim_builder("PGD", ...)``), its ``L2`` data fidelity and its
``TVPrior`` (whose prox is deepinv's ``TVDenoiser``, a Chambolle-Pock inner
solver warm-started across the outer iterations)::

    x_{k+1} = prox_{gamma lam TV}(x_k - gamma A^T (A x_k - y)),   x_0 = A^+ y

``gamma = 1 / ||A||^2 = 1`` for every operator of the toolkit (cs,
inpainting and mri are partial isometries, ct is normalised to unit norm);
pass ``stepsize`` for other operators. No prior network: 0 NFEs, no
randomness. The result is not clamped.

Defaults per task (:data:`TV_DEFAULTS`) and how they were chosen: see
``TV_DEFAULTS``' comment below; override with ``lam=`` / ``iters=``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

#: Per-task ``(lam, iters)``. PLACEHOLDER, replaced after tuning (see module docstring).
TV_DEFAULTS = MappingProxyType(
    {
        "cs": (0.01, 200),
        "inpainting": (0.01, 200),
        "mri": (0.01, 200),
        "ct": (0.01, 200),
    }
)
#: For operators of other tasks.
FALLBACK_DEFAULTS = (0.01, 200)


class TV:
    """TV-regularised least squares by deepinv's PGD (see the module docstring).

    Args:
        lam: regularisation weight; ``None`` = the task default (:data:`TV_DEFAULTS`).
        iters: outer PGD iterations; ``None`` = the task default.
        inner_iters: iterations of the TV prox (warm-started) per outer iteration.
        stepsize: ``gamma``; must be ``<= 1 / ||A||^2`` (1 for the toolkit's operators).
        progress: show a tqdm bar over the outer iterations (``leave=False``).
    """

    name = "tv"
    nfe = 0

    def __init__(
        self,
        lam: float | None = None,
        iters: int | None = None,
        inner_iters: int = 10,
        stepsize: float = 1.0,
        progress: bool = True,
    ):
        if lam is not None and not float(lam) >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        if iters is not None and int(iters) < 1:
            raise ValueError(f"iters must be >= 1, got {iters!r}")
        if int(inner_iters) < 1:
            raise ValueError(f"inner_iters must be >= 1, got {inner_iters!r}")
        if not float(stepsize) > 0:
            raise ValueError(f"stepsize must be > 0, got {stepsize!r}")
        self.lam = None if lam is None else float(lam)
        self.iters = None if iters is None else int(iters)
        self.inner_iters = int(inner_iters)
        self.stepsize = float(stepsize)
        self.progress = bool(progress)

    def settings(self, op: Any) -> tuple[float, int]:
        """``(lam, iters)`` used for ``op``: the given values, else the task's defaults."""
        lam, iters = TV_DEFAULTS.get(getattr(op, "name", None), FALLBACK_DEFAULTS)
        return (self.lam if self.lam is not None else lam, self.iters if self.iters is not None else iters)

    def __call__(self, y: Tensor, op: Any, generator: torch.Generator | None = None) -> Tensor:
        """``(B, C, H, W)`` TV reconstruction (``generator`` is unused: the solver is deterministic)."""
        from deepinv.optim import L2, PGD, TVPrior

        lam, iters = self.settings(op)
        # A fresh prior per call: TVDenoiser keeps warm-start state, which must not leak between calls.
        prior = TVPrior(def_crit=0.0, n_it_max=self.inner_iters)
        solver = PGD(data_fidelity=L2(), prior=prior, lambda_reg=lam, stepsize=self.stepsize, max_iter=1)
        with torch.no_grad():
            x = op.A_dagger(y)
            # One outer iteration per call, so that the loop can show progress; PGD has no
            # state besides the iterate and the prox's warm start (kept in ``prior``), so
            # this equals a single ``max_iter=iters`` run.
            for _ in tqdm(range(iters), desc="tv", leave=False, disable=not self.progress):
                x = solver(y, op, init=x)
        return x

    def __repr__(self) -> str:
        return f"TV(lam={self.lam}, iters={self.iters}, inner_iters={self.inner_iters}, stepsize={self.stepsize})"
