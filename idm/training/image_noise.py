"""Gaussian noise on training images, targets included: clean images made to look like scanner data.

A fully sampled scanner image carries thermal noise everywhere, its dark
background included: on ``brain512_singlecoil.h5`` about 0.015 of the
largest magnitude per channel (real, imaginary). The simulated-k-space
training images (``ChestTrain``) have backgrounds of exact zeros. A network
that has never seen noise turns the aliased noise of an undersampled scan
into structure of its own in the unmeasured frequencies, which costs SSIM in
the background against the noisy reference (``benchmarks.ssim_regions``).

``idm train --image-noise SIGMA`` adds ``N(0, s^2)`` to every pixel and
channel of each training image, ``s`` drawn per image uniformly in
``[0, SIGMA]`` (so clean images stay in the mix), *before* the measurements
are simulated: the target is the noisy image, as a scanner's fully sampled
reference is, and the best guess of the unmeasured part of the noise is
zero. Values are in the images' own units (``[0, 1]`` images: a fraction of
full scale).
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_noise_level", "draw_image_noise"]


def check_noise_level(level: float) -> float:
    """``level`` (the largest per-image noise standard deviation) as a float in ``[0, 1)``, or a ``ValueError``
    naming it."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"image_noise must be a standard deviation in [0, 1), got {level!r}") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"image_noise must be a standard deviation in [0, 1), got {level!r}")
    return value


def draw_image_noise(shape: tuple[int, ...], level: float, generator: torch.Generator) -> torch.Tensor:
    """Float32 Gaussian noise of ``shape`` ``(B, C, H, W)``, each image's standard deviation uniform in ``[0, level]``
    (add it to the images).

    The per-image deviations are drawn first, then the noise, both from ``generator``.
    """
    if len(shape) != 4:
        raise ValueError(f"image noise needs a batch of images (B, C, H, W), got {tuple(shape)}")
    stds = torch.rand(shape[0], 1, 1, 1, generator=generator) * check_noise_level(level)
    return stds * torch.randn(shape, generator=generator)
