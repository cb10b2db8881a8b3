"""An exponential moving average (EMA) of a module's weights, for ``idm pretrain`` and ``idm train``.

A short run at a constant learning rate leaves its weights wherever the
last few batches pushed them: the checkpoints of one CPU run of
``cs-ratio-1-50`` (batch 4, lr 2e-5) scored between 22.7 and 24.0 dB at
10 % on the same ten images (``idm/weights/README.md``). An average of the
recent weights does not depend on the last few batches alone; it costs
one float32 copy of the weights and one multiply-add per weight per step.
Measured once on such a run (183 iterations, decay 0.98), the average
trailed the last weights by 0.22 dB: a run still climbing outruns it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a module's floating-point state (float32 copies, on the module's device).

    ``update`` after every optimizer step: ``shadow = d * shadow + (1 - d) * weights`` with
    ``d = min(decay, (1 + n) / (10 + n))``, ``n`` the number of earlier updates (a deterministic warm-up, so
    the first updates follow the weights closely). Non-floating-point entries (integer buffers) are not averaged.

    Attributes:
        decay: the largest ``d``, in [0, 1).
        updates: how many updates so far (a resumed run sets it from its checkpoint).
        shadow: ``{state-dict key: float32 tensor}``, the averages.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the averages towards ``module``'s current weights (call after each optimizer step)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
        self.updates += 1

    def weights_for(self, module: nn.Module) -> dict[str, Tensor]:
        """``module``'s state dict with the averaged values in place of the floating-point ones."""
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in module.state_dict().items()}

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``module`` holds the averaged weights (to save or validate them); on leaving it,
        even by an exception, its own weights are put back bit for bit."""
        state = module.state_dict()
        own = {k: state[k].detach().clone() for k in self.shadow}
        with torch.no_grad():
            for k, average in self.shadow.items():
                state[k].copy_(average)
        try:
            yield module
        finally:
            with torch.no_grad():
                for k, weights in own.items():
                    state[k].copy_(weights)
