"""Sparse-view parallel-beam CT: the Radon transform at a few angles (``"ct"``).

The geometry is deepinv's pure-PyTorch :class:`deepinv.physics.Tomography`
(bilinear ``grid_sample`` of the rotated image, summed along the rays).  It
stands in for torch-radon, which the IDM authors used but which cannot be
installed with current PyTorch; the two discretisations differ slightly, so
numbers are not bit-comparable with torch-radon results.

* ``views`` angles uniformly over ``[0, 180)`` degrees (``k * 180 / views``),
  ``circle=False`` (the whole square image is seen), square images only.
* Measurement (sinogram) layout as deepinv returns it: ``(B, C, D, views)``,
  ``D = ceil(sqrt(2) * W)`` detector cells (the image diagonal), angles last.
* The projector is deepinv's Radon transform written out as a sparse matrix
  ``R`` (``operators.sampling_matrix``: deepinv's own sampling grids, the
  bilinear weights of ``grid_sample``), equal to deepinv's ``Tomography.A``
  to rounding (tested in float64).  Only the views in ``[0, 45]`` degrees are
  stored; the others are quarter turns and mirrors of them
  (``operators.symmetric_projector``).  Applying it is one sparse-dense
  product with four transformed copies of the image, and the exact adjoint
  is the stored transpose: on the CPU, ``A^+ A`` with its backward runs
  several times faster than through ``grid_sample``.
* ``A`` is normalised to unit operator norm (``A = R / ||R||``, as deepinv's
  ``normalize=True``).  ``||R||`` is computed here, once, by a deterministic
  power iteration in float64.
* ``A_adjoint`` is the *exact* adjoint of ``A`` (``R^T / ||R||``; deepinv's
  ``adjoint_via_backprop=True``), not deepinv's interpolated inverse-Radon
  back-projection (which is off by a few %).
* ``A_dagger`` is *approximate*: filtered back-projection by default (deepinv's
  ramp filter along the detector, Hann-windowed unless ``fbp_filter="ramp"``,
  then the exact back-projection ``R^T``, scaled by ``pi / (2 views)``, as
  deepinv's ``Tomography.fbp``), or, with
  ``pinv="cg"``, the minimum-norm least squares solution of ``A x = y`` by
  ``cg_iters`` conjugate-gradient steps on the normal equations
  (:func:`operators.least_squares.least_squares_solve`; exact only at
  convergence; slow for many views).
* Why Hann: IDM's range-null-space step ``x0 + A^+ (y - A x0)`` must not
  amplify the errors of ``x0``. With the bare ramp filter ``FBP A`` has
  eigenvalues near 6.6 at 60 views (high frequencies along the projection
  angles), so ``||I - FBP A|| = 5.6`` on 256x256 images; with the Hann window
  it is 1.2, and the FBP itself is better (36.6 / 34.8 dB against 36.1 / 34.2
  dB on two clinical slices at 256x256): ``python -m benchmarks.ct_start``,
  ``tests/test_operators.py::test_ct_hann_fbp_barely_amplifies_what_it_cannot_see``.

Device and dtype (float32, float64) follow the input.  The float64 weights
are built once, at construction (about 6 s at 256x256 and 60 views on the
CPU, for all views: the symmetries are found by comparing them), and kept;
every other device and dtype is converted from them on first use.
Memory: the stored views have about ``2.2 * W * W`` nonzeros each (2.3 M for
256x256 at 60 views, of which 16 are stored), kept twice (the matrix and its
transpose) at a value and a 32-bit index each: 37 MB in float32 and 55 MB
in float64 for 256x256 at 60 views, four times that at 512x512, per (device,
dtype) used.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from deepinv.physics.functional.radon import RampFilter

from . import register
from .base import Operator, OperatorInputError, check_float32_or_64, check_positive_int, kept_between_calls
from .least_squares import least_squares_solve
from .sampling_matrix import bilinear_weights, sparse_from_triplets
from .symmetric_projector import SymmetricProjector

_PINVS = ("fbp", "cg")
_FBP_FILTERS = ("hann", "ramp")


class HannFilter(RampFilter):
    """deepinv's ramp filter times a Hann window ``(1 + cos(pi f / f_Nyquist)) / 2`` (a module, as deepinv's)."""

    def create_filter(self, f: torch.Tensor) -> torch.Tensor:
        frequency = torch.linspace(0.0, 1.0, f.shape[-1], dtype=f.real.dtype, device=f.device)  # rfft bins 0 .. Nyquist
        return f * (0.5 * (1.0 + torch.cos(math.pi * frequency)))


@register("ct")
class CT(Operator):
    """Sparse-view parallel-beam Radon transform (see the module docstring).

    Args:
        img_size: ``(H, W)`` with ``H == W`` (at least 4).
        channels: ``C`` (usually 1); each channel is projected separately.
        views: number of projection angles ``>= 1``, uniform over ``[0, 180)``.
        pinv: ``"fbp"`` (filtered back-projection, default) or ``"cg"``
            (conjugate-gradient least squares) for :meth:`A_dagger`.
        fbp_filter: ``"hann"`` (ramp times a Hann window, default) or ``"ramp"``.
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
        fbp_filter: str = "hann",
    ):
        super().__init__(img_size, channels)
        h, w = self.img_hw
        if h != w:
            raise OperatorInputError(f"ct needs a square img_size (H == W), got {self.img_hw}")
        if w < 4:
            raise OperatorInputError(f"img_size must be at least 4x4 for ct, got {self.img_hw}")
        self.views = check_positive_int(views, "views")
        if pinv not in _PINVS:
            raise OperatorInputError(f"pinv must be one of {_PINVS}, got {pinv!r}")
        self.pinv = pinv
        if fbp_filter not in _FBP_FILTERS:
            raise OperatorInputError(f"fbp_filter must be one of {_FBP_FILTERS}, got {fbp_filter!r}")
        self.fbp_filter = fbp_filter
        self.cg_iters = check_positive_int(cg_iters, "cg_iters")
        try:
            self.cg_tol = float(cg_tol)
        except (TypeError, ValueError):
            raise OperatorInputError(f"cg_tol must be a positive number, got {cg_tol!r}") from None
        if not math.isfinite(self.cg_tol) or self.cg_tol <= 0:
            raise OperatorInputError(f"cg_tol must be a positive number, got {cg_tol!r}")
        #: ``(views,)`` float64 projection angles in degrees, ``k * 180 / views``.
        self.angles = torch.arange(self.views, dtype=torch.float64) * (180.0 / self.views)
        self.detectors = math.ceil(math.sqrt(2) * w)
        # Projectors and FBP filters per (device, dtype): not submodules, so .to() leaves them alone.
        exact = self._build_projector()  # float64, CPU: kept, every other copy is converted from it
        self._projectors: dict[tuple[torch.device, torch.dtype], SymmetricProjector] = {
            (torch.device("cpu"), torch.float64): exact
        }
        self._filters: dict[tuple[torch.device, torch.dtype], tuple[Any, torch.Tensor, int]] = {}  # module, response, padding
        self.radon_norm = self._power_norm(exact)

    # ---- the projector ------------------------------------------------------------------
    def _projector(self, like: torch.Tensor) -> SymmetricProjector:
        """``R`` (unnormalised Radon transform) on ``like``'s device and dtype (float32 or float64, which
        ``A``, ``A_adjoint`` and ``fbp`` check), converted on first use."""
        key = (like.device, like.dtype)
        projector = self._projectors.get(key)
        if projector is None:
            with kept_between_calls():
                projector = self._projectors[key] = self._projectors[(torch.device("cpu"), torch.float64)].to(*key)
        return projector

    def _build_projector(self) -> SymmetricProjector:
        """deepinv's Radon transform as a :class:`SymmetricProjector` (float64, CPU).

        deepinv zero-pads the image to ``D x D`` and samples it on one
        ``D x D`` grid per angle, summing each grid column along the ray;
        each view is written out as the bilinear weights of that grid. The
        rotation centre is the padded grid's, so the views are stored over
        the smallest square about it that holds the image (the domain).
        """
        from deepinv.physics.functional.radon import Radon

        size, d = self.img_hw[1], self.detectors
        radon = Radon(size, theta=self.angles, circle=False, dtype=torch.float64)
        grids = radon.all_grids[0]  # (D, views * D, 2): angle v is columns [v * D, (v + 1) * D)
        if grids.shape != (d, self.views * d, 2):
            raise RuntimeError(f"unexpected deepinv Radon grid shape {tuple(grids.shape)} for {size}x{size}, {self.views} views")
        pad_before = d // 2 - size // 2  # deepinv pads the image to D x D, this many zeros before it
        twice_centre = d - 1  # in padded pixels, times 2 (integer also when the centre falls between pixels)
        half_span = max(twice_centre - 2 * pad_before, 2 * (pad_before + size - 1) - twice_centre)  # 2 x half-width
        domain_start, domain_size = (twice_centre - half_span) // 2, half_span + 1

        def view_matrix(v: int) -> torch.Tensor:
            sample, pixel, weight = bilinear_weights(grids[:, v * d : (v + 1) * d], d, d)
            row, col = pixel // d - domain_start, pixel % d - domain_start  # padded pixel -> domain pixel
            inside = (row >= 0) & (row < domain_size) & (col >= 0) & (col < domain_size)
            detector = sample[inside] % d  # sample (h, d') lies on ray d' of this angle
            return sparse_from_triplets(detector, row[inside] * domain_size + col[inside], weight[inside],
                                        (d, domain_size * domain_size))

        return SymmetricProjector.from_views(view_matrix, self.views, d, size, domain_size, pad_before - domain_start)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """``R x``: ``(B, C, W, W)`` -> ``(B, C, D, views)``."""
        b, c = x.shape[:2]
        return self._projector(x).project(x.reshape(b * c, *self.img_hw)).reshape(b, c, self.detectors, self.views)

    def _back_project(self, y: torch.Tensor) -> torch.Tensor:
        """``R^T y``: ``(B, C, D, views)`` -> ``(B, C, W, W)``."""
        b, c = y.shape[:2]
        return self._projector(y).back_project(y.reshape(b * c, self.detectors, self.views)).reshape(b, c, *self.img_hw)

    def _filter(self, y: torch.Tensor) -> torch.Tensor:
        """The FBP filter (deepinv's ramp, Hann-windowed or not) along the detector axis of ``(B, C, D, views)``.

        The same as calling deepinv's filter module, whose forward rebuilds
        the frequency response from host tensors on every call (a host-to-
        device copy, which waits for the GPU); here it is built once per
        device and dtype and kept.
        """
        key = (y.device, y.dtype)
        cached = self._filters.get(key)
        if cached is None:
            filt = (HannFilter if self.fbp_filter == "hann" else RampFilter)(dtype=y.dtype)
            padded = max(64, 2 ** math.ceil(math.log2(2 * self.detectors)))  # deepinv's zero-padded FFT length
            with kept_between_calls():
                response = filt.create_filter(filt._get_fourier_filter(padded, device=y.device)).unsqueeze(-1)
            cached = self._filters[key] = (filt, response, padded - self.detectors)
        filt, response, pad_width = cached
        return filt.filter(y, response, pad_width, dim=-2)

    def _power_norm(self, projector: SymmetricProjector, max_iter: int = 30, tol: float = 1e-7) -> float:
        """``||R||_2`` by power iteration from a constant image (deterministic, float64)."""
        v = torch.ones(1, *self.img_hw, dtype=torch.float64)
        v = v / v.norm()
        sq = 0.0
        for _ in range(max_iter):
            u = projector.back_project(projector.project(v))
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
        check_float32_or_64(x, self.name, "x")
        return self._project(x) / self.radon_norm

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact adjoint (``R^T / ||R||``): ``(B, C, D, views)`` -> ``(B, C, W, W)``."""
        self.check_measurement(y)
        check_float32_or_64(y, self.name, "y")
        return self._back_project(y) / self.radon_norm

    @property
    def exact_pinv(self) -> bool:
        """False: FBP and a finite number of CG steps are approximate pseudo-inverses."""
        return False

    @property
    def linear_pinv(self) -> bool:
        """True for FBP; False for ``pinv="cg"``, whose solve stopped at a tolerance moves by 1e-3 for a change
        of ``y`` by rounding (so the memory-saving backward refuses it: :func:`operators.has_linear_pinv`)."""
        return self.pinv != "cg"

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Approximate inverse: FBP (``pinv="fbp"``) or CG least squares (``pinv="cg"``)."""
        if self.pinv == "fbp":
            return self.fbp(y)
        self.check_measurement(y)
        return least_squares_solve(self, y, max_iter=self.cg_iters, tol=self.cg_tol)

    def fbp(self, y: torch.Tensor) -> torch.Tensor:
        """Filtered back-projection (filter, then ``R^T``) of a sinogram of this operator (approximate).

        With ``fbp_filter="ramp"``, the same map as deepinv's ``Tomography.fbp``
        with ``adjoint_via_backprop=True``.
        """
        self.check_measurement(y)
        check_float32_or_64(y, self.name, "y")
        return self._back_project(self._filter(y * self.radon_norm)) * (math.pi / (2 * self.views))

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "img_size": list(self.img_hw),
            "channels": self.channels,
            "views": self.views,
            "pinv": self.pinv,
            "cg_iters": self.cg_iters,
            "cg_tol": self.cg_tol,
            "fbp_filter": self.fbp_filter,
        }

