"""``pinv``: the pseudo-inverse ``A^+ y`` (filtered back-projection for CT).

The zero-cost reference every other method must beat. It uses the operator's
own ``A_dagger``: exact for cs / inpainting / mri, FBP for ct (``pinv="fbp"``,
the default of :class:`operators.ct.CT`; ``pinv="cg"`` gives least squares).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class PseudoInverse:
    """``x_hat = A^+ y``; no prior, no randomness, 0 NFEs."""

    name = "pinv"
    nfe = 0
    warm_up = True  # cheap: the harness runs it once untimed first (benchmarks.harness.run_benchmark)

    def __init__(self, progress: bool = True):
        del progress  # accepted for a uniform construction; there is no loop to show

    def __call__(self, y: Tensor, op: Any, generator: torch.Generator | None = None) -> Tensor:
        """``(B, C, H, W)`` image ``op.A_dagger(y)`` (``generator`` is unused)."""
        with torch.no_grad():
            return op.A_dagger(y)

    def __repr__(self) -> str:
        return "PseudoInverse()"
