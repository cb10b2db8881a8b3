"""Random smooth phase for complex (MRI) training images: magnitude images made to look like scanner data.

The simulated-k-space protocol turns magnitude images into complex images
with a zero imaginary part. A network trained on those alone learns that the
imaginary part is zero: on real k-space, whose images carry a smooth phase
(field inhomogeneity, coil and receiver phase), it falls back to about the
zero-filled image. Multiplying each training image by ``exp(i phi)``, with
``phi`` a random smooth field, keeps its magnitude (what is scored) and
shows the network images with phase (``idm train --random-phase``).

``phi = theta + field``: ``theta`` uniform in ``[-pi, pi)`` (a global phase)
and ``field`` a :data:`GRID` x :data:`GRID` grid of normal draws with
standard deviation :data:`FIELD_STD` radians, bicubically interpolated to the
image size (a few slow undulations across the field of view).

Training may phase only a fraction of the images (``idm train --random-phase
0.5``), the others kept as they are read, so that one model serves both
magnitude images and real k-space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["FIELD_STD", "GRID", "check_phase_fraction", "random_phase_maps", "with_phase"]

#: Control points per side of the smooth part of the phase.
GRID = 4
#: Standard deviation (radians) of the smooth part at the control points.
FIELD_STD = math.pi / 4


def check_phase_fraction(fraction: float) -> float:
    """``fraction`` (the share of training images given a phase) as a float in ``[0, 1]``, or a ``ValueError``
    naming it. ``True`` / ``False`` (how runs before the fraction recorded it) read as 1 / 0."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"random_phase must be a fraction of the images in [0, 1], got {fraction!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"random_phase must be a fraction of the images in [0, 1], got {fraction!r}")
    return value


def random_phase_maps(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, height, width)`` float32 phase maps in radians (see the module docstring), drawn from ``generator``."""
    theta = (torch.rand(batch, 1, 1, generator=generator) * 2 - 1) * math.pi
    grid = torch.randn(batch, 1, GRID, GRID, generator=generator) * FIELD_STD
    field = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)[:, 0]
    return theta + field


def with_phase(images: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Complex images ``(B, 2, H, W)`` (real, imaginary) multiplied by ``exp(i phase)``, ``phase`` ``(B, H, W)``:
    the same magnitudes, rotated. A ``ValueError`` for other shapes."""
    if images.dim() != 4 or images.shape[1] != 2:
        raise ValueError(f"random phase needs complex images (B, 2, H, W) (real, imaginary), got {tuple(images.shape)}")
    if phase.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"phase must be (B, H, W) = {(images.shape[0], *images.shape[-2:])}, got {tuple(phase.shape)}")
    phase = phase.to(images.dtype)
    cos, sin = torch.cos(phase), torch.sin(phase)
    real, imag = images[:, 0], images[:, 1]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=1)
