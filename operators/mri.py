"""Single-coil Cartesian MRI: undersampled centred 2-D Fourier transform (``"mri"``).

``A(x) = M F x`` with ``F`` the centred orthonormal 2-D DFT,
``F x = fftshift(fft2(ifftshift(x), norm="ortho"))`` over the last two dims,
and ``M`` a 0/1 mask that keeps whole k-space columns (phase-encode lines
along ``W``; every row ``H`` of a kept column is kept).  ``F`` is unitary and
``M`` an orthogonal projection, so ``A_adjoint(y) = F^H (M y)`` is the exact
adjoint *and* the exact pseudo-inverse.

Column masks come from fastMRI's own mask functions (not re-implemented):

* ``mask_type="random"`` -> ``fastmri.data.subsample.RandomMaskFunc``: the
  ``round(W * center_fraction)`` central columns plus each other column with
  the probability that makes the expected number of columns ``W /
  acceleration``;
* ``mask_type="equispaced"`` -> ``fastmri.data.subsample.EquispacedMaskFractionFunc``
  (the variant used for the public fastMRI multicoil data): the central columns
  plus equally spaced columns whose spacing is adjusted so that the total is
  about ``W / acceleration``, with a seeded random offset.

The mask is drawn once, deterministically, from ``seed`` (fastMRI seeds a
numpy ``RandomState``); ``resample(seed)`` draws a new one.

* ``mask_type="given"`` with ``columns=`` (``W`` zeros and ones) uses a
  column mask that already exists, e.g. the ``mask`` of a fastMRI test file
  (whose k-space was undersampled at the scanner). ``acceleration``,
  ``center_fraction`` and ``seed`` are then unused; the config stores the
  columns, and ``resample`` returns the operator itself.

deepinv's ``deepinv.physics.MRI`` applies the same kind of model but keeps
its mask as a module buffer of a fixed dtype and uses its own shift
conventions, so this module writes the few lines itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import register
from .base import Operator, OperatorInputError, check_float32_or_64, check_seed

_MASK_TYPES = ("random", "equispaced", "given")
_DIMS = (-2, -1)


def centered_fft2(z: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D DFT of a complex tensor over its last two dims."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(z, dim=_DIMS), norm="ortho"), dim=_DIMS)


def centered_ifft2(k: torch.Tensor) -> torch.Tensor:
    """Inverse (= adjoint) of :func:`centered_fft2`."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=_DIMS), norm="ortho"), dim=_DIMS)


def _to_complex(t: torch.Tensor) -> torch.Tensor:
    return torch.complex(t[:, 0], t[:, 1])


def _to_channels(z: torch.Tensor) -> torch.Tensor:
    return torch.stack((z.real, z.imag), dim=1)


@register("mri")
class MRI(Operator):
    """Single-coil Cartesian k-space undersampling (see the module docstring).

    Args:
        img_size: ``(H, W)``; columns (``W``) are the phase-encode lines.
        acceleration: undersampling factor ``>= 1`` (e.g. 4 or 8).
        center_fraction: fraction of fully sampled central columns in ``[0, 1)``
            (e.g. 0.08 at 4x, 0.04 at 8x); ``round(W * center_fraction) *
            acceleration`` must stay below ``W``.
        mask_type: ``"random"``, ``"equispaced"``, or ``"given"`` (use ``columns``).
        seed: seed of the mask draw.
        channels: must be 2 (the real and imaginary parts).
        columns: with ``mask_type="given"`` only: the sampled k-space columns,
            a sequence of ``W`` zeros and ones (or booleans) with at least one 1.
            :attr:`acceleration` is then ``W / (number of ones)``,
            :attr:`center_fraction` and :attr:`seed` are ``None``.

    Shapes: ``x`` is ``(B, 2, H, W)``, channel 0 the real and channel 1 the
    imaginary part of the complex image (magnitude images: imaginary 0).
    ``y = A(x)`` is ``(B, 2, H, W)``: the real / imaginary parts of the centred
    k-space, zero off the mask.  ``A_adjoint(y) = A_dagger(y) = F^H(M y)``,
    ``(B, 2, H, W)``, exact.  float32 (complex64) and float64 (complex128)
    inputs are computed in their own precision on their own device.
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        acceleration: float = 4,
        center_fraction: float = 0.08,
        mask_type: str = "random",
        seed: int = 0,
        channels: int = 2,
        columns: Any = None,
    ):
        if channels != 2:
            raise OperatorInputError(
                f"channels must be 2 for mri (complex images as real, imag channels), got {channels!r}"
            )
        super().__init__(img_size, 2)
        if mask_type not in _MASK_TYPES:
            raise OperatorInputError(f"mask_type must be one of {_MASK_TYPES}, got {mask_type!r}")
        if mask_type == "given":
            self._init_given(columns)
            return
        if columns is not None:
            raise OperatorInputError(f"columns= is only used with mask_type='given', not {mask_type!r}")
        try:
            acc = float(acceleration)
        except (TypeError, ValueError):
            raise OperatorInputError(f"acceleration must be a number >= 1, got {acceleration!r}") from None
        if not math.isfinite(acc) or acc < 1:
            raise OperatorInputError(f"acceleration must be a finite number >= 1, got {acceleration!r}")
        try:
            cf = float(center_fraction)
        except (TypeError, ValueError):
            raise OperatorInputError(f"center_fraction must be a number in [0, 1), got {center_fraction!r}") from None
        if not math.isfinite(cf) or not 0.0 <= cf < 1.0:
            raise OperatorInputError(f"center_fraction must be in [0, 1), got {center_fraction!r}")
        width = self.img_hw[1]
        if acc > width:
            raise OperatorInputError(
                f"acceleration={acceleration!r} keeps fewer than one of the {width} k-space columns; at most {width}"
            )
        if round(width * cf) * acc >= width:
            raise OperatorInputError(
                f"center_fraction={center_fraction!r} keeps {round(width * cf)} central columns of {width}, "
                f"at least the 1/acceleration = 1/{acceleration} budget; lower center_fraction or acceleration"
            )
        self.acceleration = int(acc) if acc.is_integer() else acc
        self.center_fraction = cf
        self.mask_type = mask_type
        self.seed = check_seed(seed)
        columns = self._draw_columns(width)
        if not columns.any():
            raise OperatorInputError(
                f"the {mask_type} mask for seed={seed} keeps no k-space column of width {width}; "
                "raise center_fraction"
            )
        self._columns = columns  # (W,) float64 0/1

    def _init_given(self, columns: Any) -> None:
        """``mask_type="given"``: check and store an existing column mask."""
        width = self.img_hw[1]
        if columns is None:
            raise OperatorInputError("mask_type='given' needs columns= (the W sampled k-space columns as 0/1)")
        try:
            cols = torch.as_tensor(columns).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise OperatorInputError(f"columns must be a sequence of {width} zeros and ones, got {columns!r:.100}") from None
        if cols.dim() != 1 or cols.numel() != width:
            raise OperatorInputError(
                f"columns must hold one 0/1 entry per k-space column ({width} for img_size {self.img_hw}), "
                f"got shape {tuple(cols.shape)}"
            )
        if cols.is_complex() or not bool(((cols == 0) | (cols == 1)).all()):
            raise OperatorInputError("columns must contain only zeros and ones")
        cols = cols.to(torch.float64)
        kept = int(cols.sum())
        if kept == 0:
            raise OperatorInputError("the given mask keeps no k-space column")
        self.mask_type = "given"
        self.acceleration = width / kept
        self.center_fraction = None
        self.seed = None
        self._columns = cols

    def _draw_columns(self, width: int) -> torch.Tensor:
        from fastmri.data.subsample import EquispacedMaskFractionFunc, RandomMaskFunc

        cls = RandomMaskFunc if self.mask_type == "random" else EquispacedMaskFractionFunc
        mask_func = cls(center_fractions=[self.center_fraction], accelerations=[self.acceleration], seed=self.seed)
        mask, _ = mask_func((1, width, 1), seed=self.seed)
        return mask.reshape(width).to(torch.float64)

    @property
    def mask(self) -> torch.Tensor:
        """``(H, W)`` float64 CPU 0/1 k-space mask (whole columns)."""
        return self._columns.expand(self.img_hw).clone()

    @property
    def sampled_fraction(self) -> float:
        """Fraction of k-space columns kept (about ``1 / acceleration``)."""
        return float(self._columns.mean())

    def measurement_shape(self) -> tuple[int, int, int]:
        """``(2, H, W)``."""
        return (2, *self.img_hw)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """``(B, 2, H, W)`` image -> ``(B, 2, H, W)`` masked centred k-space."""
        self.check_image(x)
        check_float32_or_64(x, self.name, "x")
        return _to_channels(centered_fft2(_to_complex(x)) * self.cast_like(self._columns, x))

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """``F^H (M y)``: ``(B, 2, H, W)`` k-space -> ``(B, 2, H, W)`` image (exact)."""
        self.check_measurement(y)
        check_float32_or_64(y, self.name, "y")
        return _to_channels(centered_ifft2(_to_complex(y) * self.cast_like(self._columns, y)))

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact pseudo-inverse, equal to :meth:`A_adjoint` (zero-filled reconstruction)."""
        return self.A_adjoint(y)

    def config(self) -> dict[str, Any]:
        if self.mask_type == "given":
            return {
                "name": self.name,
                "img_size": list(self.img_hw),
                "mask_type": "given",
                "columns": [int(c) for c in self._columns.tolist()],
            }
        return {
            "name": self.name,
            "img_size": list(self.img_hw),
            "acceleration": self.acceleration,
            "center_fraction": self.center_fraction,
            "mask_type": self.mask_type,
            "seed": self.seed,
        }
