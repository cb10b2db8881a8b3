"""Sparse-view parallel-beam CT: the Radon transform at a few angles (``"ct"``).

The projector is deepinv's pure-PyTorch :class:`deepinv.physics.Tomography`
(bilinear ``grid_sample`` of the rotated image, summed along the rays).  It
stands in for torch-radon, which the IDM authors used but which cannot be
installed with current PyTorch; the two discretisations differ slightly, so
numbers are not bit-comparable with torch-radon results.

* ``views`` angles uniformly over ``[0, 180)`` degrees (``k * 180 / views``),
  ``circle=False`` (the whole square image is seen), square images only.
* Measurement (sinogram) layout as deepinv returns it: ``(B, C, D, views)``,
  ``D = ceil(sqrt(2) * W)`` detector cells (the image diagonal), angles last.
* ``A`` is normalised to unit operator norm (``A = R / ||R||``, as deepinv's
  ``normalize=True``).  ``||R||`` is computed here, once, by a deterministic
  power iteration in float64: deepinv's own ``normalize=True`` cannot build a
  float64 operator (it estimates the norm from a float32 ``randn`` and
  ``grid_sample`` then fails with "expected scalar type Float but found
  Double"), so the deepinv operators are built with ``normalize=False``.
* ``A_adjoint`` is the *exact* adjoint of ``A``: deepinv's
  ``adjoint_via_backprop=True`` (autograd through ``grid_sample``), not its
  interpolated inverse-Radon back-projection (which is off by a few %).
* ``A_dagger`` is *approximate*: filtered back-projection (ramp filter,
  deepinv's ``fbp``) by default, or, with ``pinv="cg"``, the minimum-norm least
  squares solution of ``A x = y`` by ``cg_iters`` conjugate-gradient steps on
  the normal equations (exact only at convergence; slow for many views).

Device and dtype follow the input: one deepinv operator is built per (device,
dtype) met, from the same float64 angles (the float64 CPU one at
construction).  Memory: deepinv precomputes the sampling grids,
``2 * D * D * views`` numbers per operator (about 380 MB in float64, 190 MB
in float32, for a 256x256 image at 180 views), and keeps a second grid of the
same size for its inverse Radon (unused here).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import register
from .base import Operator, OperatorInputError, check_int

_PINVS = ("fbp", "cg")


@register("ct")
class CT(Operator):
    """Sparse-view parallel-beam Radon transform (see the module docstring).

    Args:
        img_size: ``(H, W)`` with ``H == W`` (at least 4).
        channels: ``C`` (usually 1); each channel is projected separately.
        views: number of projection angles ``>= 1``, uniform over ``[0, 180)``.
        pinv: ``"fbp"`` (filtered back-projection, default) or ``"cg"``
            (conjugate-gradient least squares) for :meth:`A_dagger`.
        cg_iters: maximum CG iterations for ``pinv="cg"``.
        cg_tol: relative residual tolerance of CG (on the normal equations).

    Shapes: ``x`` is ``(B, C, W, W)`` (attenuation image, typically in
    [0, 1]); ``y = A(x)`` is ``(B, C, D, views)`` with ``D = ceil(sqrt(2) W)``;
    ``A_adjoint(y)`` (exact) and ``A_dagger(y)`` (approximate) are ``(B, C, W, W)``.
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        channels: int = 1,
        views: int = 60,
        pinv: str = "fbp",
        cg_iters: int = 100,
        cg_tol: float = 1e-6,
    ):
        super().__init__(img_size, channels)
        h, w = self.img_hw
        if h != w:
            raise OperatorInputError(f"ct needs a square img_size (H == W), got {self.img_hw}")
        if w < 4:
            raise OperatorInputError(f"img_size must be at least 4x4 for ct, got {self.img_hw}")
        self.views = check_int(views, "views")
        if self.views <= 0:
            raise OperatorInputError(f"views must be a positive integer, got {views!r}")
        if pinv not in _PINVS:
            raise OperatorInputError(f"pinv must be one of {_PINVS}, got {pinv!r}")
        self.pinv = pinv
        self.cg_iters = check_int(cg_iters, "cg_iters")
        if self.cg_iters <= 0:
            raise OperatorInputError(f"cg_iters must be a positive integer, got {cg_iters!r}")
        try:
            self.cg_tol = float(cg_tol)
        except (TypeError, ValueError):
            raise OperatorInputError(f"cg_tol must be a positive number, got {cg_tol!r}") from None
        if not math.isfinite(self.cg_tol) or self.cg_tol <= 0:
            raise OperatorInputError(f"cg_tol must be a positive number, got {cg_tol!r}")
        self._angles = torch.arange(self.views, dtype=torch.float64) * (180.0 / self.views)
        # deepinv operators per (device, dtype); not submodules, so .to() leaves them alone.
        self._radon: dict[tuple[torch.device, torch.dtype], Any] = {}
        ref = self._tomography(torch.device("cpu"), torch.float64)
        self.detectors = int(ref.radon.all_grids.shape[1])
        self.radon_norm = self._power_norm(ref)

    # ---- deepinv backend ---------------------------------------------------------
    def _tomography(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        tomo = self._radon.get(key)
        if tomo is None:
            from deepinv.physics import Tomography

            tomo = Tomography(
                angles=self._angles.to(device=device, dtype=dtype),
                img_width=self.img_hw[1],
                circle=False,
                adjoint_via_backprop=True,
                normalize=False,
                device=device,
                dtype=dtype,
            )
            self._radon[key] = tomo
        return tomo

    def _backend(self, like: torch.Tensor):
        if like.dtype not in (torch.float32, torch.float64):
            raise OperatorInputError(f"ct supports float32 and float64 tensors, got {like.dtype}")
        return self._tomography(like.device, like.dtype)

    def _power_norm(self, tomo, max_iter: int = 30, tol: float = 1e-7) -> float:
        """``||R||_2`` by power iteration from a constant image (deterministic, float64)."""
        v = torch.ones(1, 1, *self.img_hw, dtype=torch.float64)
        v = v / v.norm()
        sq = 0.0
        for _ in range(max_iter):
            u = tomo.A_adjoint(tomo.A(v))
            new = float((u * v).sum())
            v = u / u.norm()
            if abs(new - sq) <= tol * new:
                sq = new
                break
            sq = new
        return math.sqrt(sq)

    # ---- operator -----------------------------------------------------------------
    def measurement_shape(self) -> tuple[int, int, int]:
        """``(C, D, views)``, ``D = ceil(sqrt(2) * W)`` detector cells."""
        return (self.channels, self.detectors, self.views)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Normalised sinogram: ``(B, C, W, W)`` -> ``(B, C, D, views)``."""
        self.check_image(x)
        return self._backend(x).A(x) / self.radon_norm

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact adjoint (autograd back-projection): ``(B, C, D, views)`` -> ``(B, C, W, W)``."""
        self.check_measurement(y)
        return self._backend(y).A_adjoint(y) / self.radon_norm

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Approximate inverse: FBP (``pinv="fbp"``) or CG least squares (``pinv="cg"``)."""
        if self.pinv == "fbp":
            return self.fbp(y)
        from deepinv.optim.linear import conjugate_gradient

        self.check_measurement(y)
        tomo = self._backend(y)
        s2 = self.radon_norm**2
        rhs = tomo.A_adjoint(y) / self.radon_norm
        return conjugate_gradient(
            lambda v: tomo.A_adjoint(tomo.A(v)) / s2,
            rhs,
            max_iter=self.cg_iters,
            tol=self.cg_tol,
            eps=1e-30,  # deepinv's default 1e-8 stalls CG once p^T A^T A p ~ 1e-8 (A has unit norm)
            parallel_dim=[0],
        )

    def fbp(self, y: torch.Tensor) -> torch.Tensor:
        """Filtered back-projection (ramp filter) of a sinogram of this operator (approximate)."""
        self.check_measurement(y)
        return self._backend(y).fbp(y * self.radon_norm)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "img_size": list(self.img_hw),
            "channels": self.channels,
            "views": self.views,
            "pinv": self.pinv,
            "cg_iters": self.cg_iters,
            "cg_tol": self.cg_tol,
        }
