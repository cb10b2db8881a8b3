"""Which Adam kernel a run uses: torch's fused one on GPUs.

The fused kernel updates all parameters in one launch per step, where the
default multi-tensor kernel launches one per operation and builds
parameter-sized temporaries (about one extra set of weights at the step's
peak). The choice belongs to the device, not to the training state: a
checkpoint restored elsewhere takes the kernel of its new device
(:func:`idm.training.state.restore_optimizer`).
"""

from __future__ import annotations

from typing import Iterable

import torch

#: Optimizer options that pick a kernel, not training state: kept from the live optimizer on restore.
KERNEL_CHOICES = ("fused", "foreach", "capturable")


def fused_by_default(params: Iterable[torch.Tensor]) -> bool | None:
    """``True`` (fused Adam) when every parameter is on a CUDA device, else ``None`` (torch's default kernel)."""
    params = list(params)
    return True if params and all(p.device.type == "cuda" for p in params) else None
