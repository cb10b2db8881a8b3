"""Image quality metrics: PSNR and SSIM (scikit-image), and the IDM paper's CS protocol.

Inputs are images ``(H, W)`` or ``(C, H, W)`` (NumPy arrays or torch tensors,
any device; computed in float64 on the CPU), normally with values in [0, 1].
SSIM uses scikit-image's defaults (7x7 uniform window, K1=0.01, K2=0.03), as
the IDM authors' evaluation does; for ``C > 1`` the per-channel SSIMs are
averaged (``channel_axis=0``). PSNR of identical images is ``inf``.

Bad input (not an array/tensor, wrong or mismatched shapes, NaN) raises
:class:`ValueError` naming the argument.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["psnr", "ssim", "cs_protocol_metrics", "batched_metrics"]

ImageLike = Union[np.ndarray, torch.Tensor]


def _as_image(x: ImageLike, name: str) -> np.ndarray:
    """float64 NumPy copy of an (H, W) or (C, H, W) image; ValueError naming ``name``."""
    if isinstance(x, torch.Tensor):
        if torch.is_complex(x):
            raise ValueError(f"{name} must be real, got complex dtype {x.dtype}")
        arr = x.detach().to("cpu", torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        if np.iscomplexobj(x) or x.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be a real numeric array, got dtype {x.dtype}")
        arr = x.astype(np.float64)
    else:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (H, W) or (C, H, W), got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN values")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contains infinite values")
    return arr


def _pair(x: ImageLike, ref: ImageLike, x_name: str = "x") -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_image(x, x_name), _as_image(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"{x_name} and ref must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _integer_range(x: ImageLike) -> float | None:
    """The largest value of ``x``'s integer dtype (255 for uint8), ``None`` for floats and booleans."""
    if isinstance(x, torch.Tensor):
        return float(torch.iinfo(x.dtype).max) if not x.dtype.is_floating_point and not x.is_complex() and x.dtype != torch.bool else None
    if isinstance(x, np.ndarray) and x.dtype.kind in "iu":
        return float(np.iinfo(x.dtype).max)
    return None


def _range_for(x: ImageLike, ref: ImageLike, data_range: float | None) -> float:
    """``data_range`` checked; ``None``: 1 for float images, the integer dtype's largest value otherwise (as
    scikit-image does: 255 for uint8)."""
    if data_range is None:
        data_range = max((r for r in (_integer_range(x), _integer_range(ref)) if r is not None), default=1.0)
    return _check_range(data_range)


def _check_range(data_range: float) -> float:
    dr = float(data_range)
    if not (dr > 0 and math.isfinite(dr)):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    return dr


def _psnr(a: np.ndarray, b: np.ndarray, dr: float) -> float:
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=dr))


def _ssim(a: np.ndarray, b: np.ndarray, dr: float) -> float:
    if a.ndim == 3 and a.shape[0] == 1:
        a, b = a[0], b[0]
    if min(a.shape[-2:]) < 7:
        raise ValueError(f"ssim needs images of at least 7x7 pixels, got {a.shape}")
    if a.ndim == 3:
        return float(structural_similarity(a, b, data_range=dr, channel_axis=0))
    return float(structural_similarity(a, b, data_range=dr))


def psnr(x: ImageLike, ref: ImageLike, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range**2 / mean((x - ref)**2))``.

    ``x``, ``ref``: ``(H, W)`` or ``(C, H, W)`` of equal shape (mean over all
    channels and pixels). ``data_range`` (default): 1 for float images, in
    [0, 1]; the dtype's largest value for integer images (255 for uint8).
    Uses :func:`skimage.metrics.peak_signal_noise_ratio`. Returns ``inf`` when ``x == ref``.
    """
    a, b = _pair(x, ref)
    return _psnr(a, b, _range_for(x, ref, data_range))


def ssim(x: ImageLike, ref: ImageLike, data_range: float | None = None) -> float:
    """Structural similarity (scikit-image defaults; mean over channels for ``(C, H, W)``).

    ``x``, ``ref``: ``(H, W)`` or ``(C, H, W)`` of equal shape, at least 7x7; ``data_range`` as for
    :func:`psnr`. ``ssim(x, x) == 1``.
    """
    a, b = _pair(x, ref)
    return _ssim(a, b, _range_for(x, ref, data_range))


def cs_protocol_metrics(x_hat: ImageLike, ref: ImageLike) -> tuple[float, float]:
    """``(PSNR, SSIM)`` by the IDM paper's compressed-sensing protocol.

    ``x_hat`` (reconstruction) and ``ref`` (ground truth): Y-channel images
    ``(H, W)`` or ``(1, H, W)`` in [0, 1] (``ref`` must lie in [0, 1]); RGB
    ``(3, H, W)`` images are scored the same way over all channels (SSIM: the
    channel mean), for CS on colour images.
    ``x_hat`` is clamped to [0, 1], both are multiplied by 255 without
    rounding, then PSNR with peak 255 and scikit-image SSIM with
    ``data_range=255`` are computed. For ``x_hat`` already in [0, 1] the PSNR
    equals :func:`psnr` with ``data_range=1``. (The authors' script returns
    100 dB for identical images; this returns ``inf``.)
    """
    a, b = _pair(x_hat, ref, "x_hat")
    if a.ndim == 3 and a.shape[0] not in (1, 3):
        raise ValueError(f"x_hat and ref must be (H, W), (1, H, W) Y or (3, H, W) RGB images, got {a.shape}")
    if b.min() < 0.0 or b.max() > 1.0:
        raise ValueError(f"ref must have values in [0, 1], got [{b.min():g}, {b.max():g}]")
    a = np.clip(a, 0.0, 1.0) * 255.0
    b = b * 255.0
    return _psnr(a, b, 255.0), _ssim(a, b, 255.0)


def batched_metrics(
    x_hat: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, cs_protocol: bool = False
) -> tuple[list[float], list[float]]:
    """Per-image ``(psnr_list, ssim_list)`` for batches ``(B, C, H, W)``.

    With ``cs_protocol=True`` each pair is scored by :func:`cs_protocol_metrics`
    (``C`` of 1 or 3; ``data_range`` ignored); otherwise by :func:`psnr`
    and :func:`ssim` with ``data_range``.
    """
    for name, t in (("x_hat", x_hat), ("ref", ref)):
        if not isinstance(t, (torch.Tensor, np.ndarray)):
            raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(t.shape)}")
    if tuple(x_hat.shape) != tuple(ref.shape):
        raise ValueError(
            f"x_hat and ref must have the same shape, got {tuple(x_hat.shape)} and {tuple(ref.shape)}"
        )
    dr = _check_range(data_range)
    psnrs, ssims = [], []
    for i in range(x_hat.shape[0]):
        if cs_protocol:
            p, s = cs_protocol_metrics(x_hat[i], ref[i])
        else:
            a, b = _as_image(x_hat[i], f"x_hat[{i}]"), _as_image(ref[i], f"ref[{i}]")
            p, s = _psnr(a, b, dr), _ssim(a, b, dr)
        psnrs.append(p)
        ssims.append(s)
    return psnrs, ssims
