"""Training losses of ``idm train``: the paper's L1, optionally plus an SSIM term, optionally in log form.

The paper trains with ``mean|x_hat - x|``. PSNR follows that loss closely;
SSIM (local means, variances and covariances) much less so, and on MRI and
CT the L1-trained models trail some baselines in SSIM while leading them in
PSNR. :class:`ReconstructionLoss` adds ``ssim_weight * (1 - SSIM)``, the mix
of "Loss Functions for Image Restoration with Neural Networks" (Zhao et al.,
2017), with an SSIM that equals the one the benchmarks report
(:func:`per_image_ssim`, scikit-image's defaults; :func:`differentiable_ssim` is its batch mean) so the two measure
the same thing.

With ``log_form=True`` the loss is the mean over images of
``log(L1_i + ssim_weight * (1 - SSIM_i))`` instead of its plain mean. The
benchmarks report mean PSNR, a mean of logarithms, and so does this: each
image's gradient is divided by its own loss, so an image (or an iteration)
whose error is 4x smaller, as a CS batch at 50 % against one at 10 % for a
model trained on a range of ratios, moves the weights as much as a hard one.
The plain mean lets the hard images dominate. (Measured once, on the
shipped any-ratio CS model, it did worse than the plain mean at every
ratio: ``idm/weights/README.md``.)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ReconstructionLoss", "check_ssim_weight", "differentiable_ssim", "per_image_ssim"]

#: scikit-image's ``structural_similarity`` defaults (uniform window, sample covariance).
SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: Added to each image's loss before the log (``log_form``): keeps the gradient finite for an exact reconstruction.
LOG_FLOOR = 1e-6


def check_ssim_weight(weight: float) -> float:
    """``weight`` as a float if it is a finite number >= 0; ``ValueError`` naming ``ssim_weight`` otherwise."""
    weight = float(weight)
    if not 0 <= weight < math.inf:
        raise ValueError(f"ssim_weight must be a finite number >= 0, got {weight}")
    return weight


def per_image_ssim(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM of each image of ``x`` against the same image of ``ref``, differentiable in both.

    ``x``, ``ref``: ``(B, C, H, W)`` with ``H, W >= 7``, values normally in
    ``[0, data_range]``. Returns ``(B,)``: each image's SSIM, the mean over
    its channels, exactly as :func:`idm.metrics.ssim` (scikit-image: 7x7
    uniform window, ``K1=0.01``, ``K2=0.03``, sample covariance, the map
    averaged over the pixels whose window lies inside the image). Equal
    images give 1.
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
    return ssim_map.reshape(b, -1).mean(dim=1)


def differentiable_ssim(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM of ``x`` against ``ref`` over the batch (a scalar tensor), differentiable in both:
    the mean of :func:`per_image_ssim` (same shapes and conventions)."""
    return per_image_ssim(x, ref, data_range).mean()


class ReconstructionLoss:
    """The mean over images of ``loss_i = mean|x_hat_i - x_i| + ssim_weight * (1 - SSIM(view(x_hat_i), view(x_i)))``,
    or of ``log(loss_i)`` (``log_form``; see the module docstring).

    Args:
        ssim_weight: weight of the SSIM term; ``0`` is the paper's L1 alone
            (the SSIM is then not computed).
        metric_view: maps ``(B, C, H, W)`` images to the ones SSIM is
            measured on, ``(B, C', H, W)`` (the MRI magnitude); identity by
            default. The L1 term always uses the images themselves.
        log_form: average ``log(loss_i + LOG_FLOOR)`` instead of ``loss_i``.

    Call with ``x_hat`` (the network's output) and ``x`` (the target), both
    ``(B, C, H, W)`` in [0, 1]; returns a scalar tensor (negative in log
    form: ``log(0.05)`` is about -3).
    """

    def __init__(
        self, ssim_weight: float = 0.0, metric_view: Callable[[Tensor], Tensor] | None = None, log_form: bool = False
    ) -> None:
        self.ssim_weight = check_ssim_weight(ssim_weight)
        self.metric_view = metric_view or (lambda t: t)
        self.log_form = bool(log_form)

    def per_image(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """``(B,)``: each image's ``loss_i`` (before any log)."""
        loss = (x_hat - x).abs().flatten(1).mean(dim=1)
        if self.ssim_weight > 0:
            loss = loss + self.ssim_weight * (1 - per_image_ssim(self.metric_view(x_hat), self.metric_view(x)))
        return loss

    def __call__(self, x_hat: Tensor, x: Tensor) -> Tensor:
        loss = self.per_image(x_hat, x)
        return torch.log(loss + LOG_FLOOR).mean() if self.log_form else loss.mean()
