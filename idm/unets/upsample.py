"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution, computed at the low resolution.

diffusers' ``Upsample2D`` (``use_conv=True``) repeats every pixel 2x2 times
and then runs a 3x3 convolution on the upsampled map. Output pixel
``(2i + a, 2j + b)`` only ever sees input rows ``i - 1 + a, i + a`` and
columns ``j - 1 + b, j + b``, so each of the four output phases ``(a, b)`` is
a 2x2 convolution of the *input* with a kernel made of sums of the 3x3
taps::

    phase a = 0: rows (i - 1, i)  get taps  (w0, w1 + w2)
    phase a = 1: rows (i, i + 1)  get taps  (w0 + w1, w2)

(the same for columns). The four phases run as one 2x2 convolution of the
zero-padded input with ``4 O`` output channels, at ``(H + 1) x (W + 1)``,
whose outputs are then interleaved: about 4/9 of the multiply-adds of the
3x3 convolution at ``2H x 2W``, and the upsampled map is never built. The result
is the same function (up to floating-point summation order), with the same
parameters and gradients. In the shipped U-Net the two upsamplers' convolutions
are a fifth of all FLOPs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _phase_taps(weight: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Along ``dim`` (the 3 taps), the 2-tap kernels of phase 0 ``(w0, w1 + w2)`` and phase 1 ``(w0 + w1, w2)``."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def phase_kernels(weight: Tensor) -> list[list[Tensor]]:
    """``kernels[a][b]``: the ``(O, I, 2, 2)`` kernel of output phase ``(a, b)`` for a ``(O, I, 3, 3)`` weight."""
    return [list(_phase_taps(rows, 3)) for rows in _phase_taps(weight, 2)]


def upsample_nearest_conv3x3(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, padding-1, stride-1 ``conv``.

    Args:
        x: ``(B, I, H, W)`` features.
        conv: the upsampler's convolution, ``I -> O`` channels.

    Returns:
        ``(B, O, 2H, 2W)``.
    """
    batch, _, height, width = x.shape
    kernels = phase_kernels(conv.weight)
    weight = torch.cat([kernels[a][b] for a in (0, 1) for b in (0, 1)])  # (4 O, I, 2, 2), phase 2a + b
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    # phase (a, b) of output pixel (i, j) is this 2x2 convolution at (i + a, j + b) of the zero-padded input
    phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), weight, bias).unflatten(1, (2, 2, conv.out_channels))
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last:  # interleave into an NHWC buffer, returned as a channels-last (B, O, 2H, 2W) view
        out = phases.new_empty(batch, height, 2, width, 2, conv.out_channels)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, :, b] = phases[:, a, b, :, a : a + height, b : b + width].permute(0, 2, 3, 1)
        return out.view(batch, 2 * height, 2 * width, conv.out_channels).permute(0, 3, 1, 2)
    out = phases.new_empty(batch, conv.out_channels, height, 2, width, 2)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, :, a, :, b] = phases[:, a, b, :, a : a + height, b : b + width]
    return out.view(batch, conv.out_channels, 2 * height, 2 * width)


def can_fold(sampler: nn.Module) -> bool:
    """Whether ``sampler`` is a diffusers ``Upsample2D`` that :func:`upsample` computes at low resolution."""
    conv = getattr(sampler, "conv", None) if getattr(sampler, "name", "conv") == "conv" else getattr(sampler, "Conv2d_0", None)
    return (
        type(sampler).__name__ == "Upsample2D"
        and getattr(sampler, "interpolate", False)
        and getattr(sampler, "use_conv", False)
        and not getattr(sampler, "use_conv_transpose", True)
        and getattr(sampler, "norm", None) is None
        and isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def upsample(sampler: nn.Module, x: Tensor) -> Tensor:
    """``sampler(x)``, through :func:`upsample_nearest_conv3x3` when :func:`can_fold` says it applies."""
    if not can_fold(sampler):
        return sampler(x)
    conv = sampler.conv if sampler.name == "conv" else sampler.Conv2d_0
    return upsample_nearest_conv3x3(x, conv)
