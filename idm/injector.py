"""Measurement injectors (paper Sec. 3.4, Eqs. 6-7).

An injector fuses the measurement physics into a U-Net feature map::

    f     = conv1(pixel_shuffle(F, r))                 # image domain, C_img channels
    g     = cat[f, A^+(A f), A^+ y]                    # 3 * C_img channels
    F_out = F + pixel_unshuffle(conv2(g), r)           # back to C channels

``r`` is the ratio between the image size and the feature map's size. The
paper writes 3x3 convolutions; the authors' code uses 1x1 ones, which is the
default here (``kernel_size`` changes it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from operators import unchecked_values


class Injector(nn.Module):
    """Adds ``{y, A}`` information to a feature map ``(B, C, H/r, W/r)``.

    Args:
        feature_channels: ``C``; must be divisible by ``r**2``.
        scale: ``r``, image size / feature size (1, 2, 4, ...).
        image_channels: ``C_img`` of the reconstructed image.
        kernel_size: of both convolutions (1 as the authors' code, 3 as the paper).
    """

    def __init__(self, feature_channels: int, scale: int, image_channels: int, kernel_size: int = 1):
        super().__init__()
        if feature_channels % (scale * scale):
            raise ValueError(
                f"an injector at scale r={scale} needs feature channels divisible by r^2={scale * scale}, "
                f"got {feature_channels}"
            )
        self.scale = scale
        shuffled = feature_channels // (scale * scale)
        pad = kernel_size // 2
        self.to_image = nn.Conv2d(shuffled, image_channels, kernel_size, padding=pad)
        self.to_feature = nn.Conv2d(3 * image_channels, shuffled, kernel_size, padding=pad)

    def forward(self, features: Tensor, op, x_pinv: Tensor) -> Tensor:
        """``features`` (B, C, H'/r, W'/r); ``op`` a LinearPhysics; ``x_pinv = A^+ y`` (B, C_img, H, W).

        ``H' >= H``, ``W' >= W`` when the U-Net padded the image to a multiple of
        its downsampling: the operator then sees the top-left ``H x W`` crop and
        the injected correction is zero on the padding.

        When the U-Net runs image channels separately, ``features`` is
        ``(B * C, ...)`` and ``C_img`` is 1: the operator sees ``f`` regrouped
        into whole ``(B, C, H, W)`` images.
        """
        f = self.to_image(F.pixel_shuffle(features, self.scale) if self.scale > 1 else features)
        height, width = x_pinv.shape[-2:]
        pad_h, pad_w = f.shape[-2] - height, f.shape[-1] - width
        f = f[..., :height, :width]
        f_op = f.to(x_pinv.dtype).reshape(x_pinv.shape)  # the operator runs in the data's precision, never under autocast
        with torch.autocast(f.device.type, enabled=False), unchecked_values():  # no host sync (operators.value_checks)
            f_range = op.A_dagger(op.A(f_op))
        g = torch.cat([f, f_range.to(f.dtype).reshape(f.shape), x_pinv.to(f.dtype).reshape(f.shape)], dim=1)
        out = F.pad(self.to_feature(g), (0, pad_w, 0, pad_h)) if pad_h or pad_w else self.to_feature(g)
        return features + (F.pixel_unshuffle(out, self.scale) if self.scale > 1 else out)
