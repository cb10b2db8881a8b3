"""Training losses of ``idm train``: the paper's L1, optionally plus an SSIM term.

The paper trains with ``mean|x_hat - x|``. PSNR follows that loss closely;
SSIM (local means, variances and covariances) much less so, and on MRI and
CT the L1-trained models trail some baselines in SSIM while leading them in
PSNR. :class:`ReconstructionLoss` adds ``ssim_weight * (1 - SSIM)``, the mix
of "Loss Functions for Image Restoration with Neural Networks" (Zhao et al.,
2017), with an SSIM that equals the one the benchmarks report
(:func:`differentiable_ssim`, scikit-image's defaults) so the two measure
the same thing.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ReconstructionLoss", "check_ssim_weight", "differentiable_ssim"]

#: scikit-image's ``structural_similarity`` defaults (uniform window, sample covariance).
SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def check_ssim_weight(weight: float) -> float:
    """``weight`` as a float if it is a finite number >= 0; ``ValueError`` naming ``ssim_weight`` otherwise."""
    weight = float(weight)
    if not 0 <= weight < math.inf:
        raise ValueError(f"ssim_weight must be a finite number >= 0, got {weight}")
    return weight


def differentiable_ssim(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM of ``x`` against ``ref``, differentiable in both.

    ``x``, ``ref``: ``(B, C, H, W)`` with ``H, W >= 7``, values normally in
    ``[0, data_range]``. Returns a scalar tensor: the mean over the batch of
    each image's SSIM, itself the mean over channels, exactly as
    :func:`idm.metrics.ssim` (scikit-image: 7x7 uniform window, ``K1=0.01``,
    ``K2=0.03``, sample covariance, the map averaged over the pixels whose
    window lies inside the image). Equal images give 1.
    """
    if x.shape != ref.shape or x.dim() != 4:
        raise ValueError(f"x and ref must be (B, C, H, W) of the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(x.shape)}")
    b, c, h, w = x.shape
    # one 7x7 mean per valid window position: scikit-image's map, cropped by its border of 3
    stats = torch.stack([x, ref, x * x, ref * ref, x * ref], dim=2).reshape(b * c, 5, h, w)
    mu_x, mu_r, m_xx, m_rr, m_xr = F.avg_pool2d(stats, SSIM_WINDOW, stride=1).unbind(dim=1)
    n = SSIM_WINDOW * SSIM_WINDOW
    unbiased = n / (n - 1)
    var_x = unbiased * (m_xx - mu_x * mu_x)
    var_r = unbiased * (m_rr - mu_r * mu_r)
    cov = unbiased * (m_xr - mu_x * mu_r)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_r * mu_r + c1) * (var_x + var_r + c2))
    return ssim_map.mean()


class ReconstructionLoss:
    """``mean|x_hat - x| + ssim_weight * (1 - SSIM(view(x_hat), view(x)))``.

    Args:
        ssim_weight: weight of the SSIM term; ``0`` is the paper's L1 alone
            (the SSIM is then not computed).
        metric_view: maps ``(B, C, H, W)`` images to the ones SSIM is
            measured on, ``(B, C', H, W)`` (the MRI magnitude); identity by
            default. The L1 term always uses the images themselves.

    Call with ``x_hat`` (the network's output) and ``x`` (the target), both
    ``(B, C, H, W)`` in [0, 1]; returns a scalar tensor.
    """

    def __init__(self, ssim_weight: float = 0.0, metric_view: Callable[[Tensor], Tensor] | None = None) -> None:
        self.ssim_weight = check_ssim_weight(ssim_weight)
        self.metric_view = metric_view or (lambda t: t)

    def __call__(self, x_hat: Tensor, x: Tensor) -> Tensor:
        loss = (x_hat - x).abs().mean()
        if self.ssim_weight > 0:
            loss = loss + self.ssim_weight * (1 - differentiable_ssim(self.metric_view(x_hat), self.metric_view(x)))
        return loss
