"""Derived randomness: every random choice of a run is a pure function of ``(seed, stream, keys...)``.

Training never reads the global RNG for data order, crops, flips/rotations,
operator draws or noise. Each draw uses a fresh :class:`torch.Generator`
seeded from :func:`derive_seed`, so

* ``--resume`` reproduces the exact same draws from the iteration number alone;
* every DDP rank computes the same operator and the same global batch without
  any communication (and takes its own slice of the batch).
"""

from __future__ import annotations

import numpy as np
import torch

#: Stream tags: independent random streams of one run.
DATA_ORDER = 1
AUGMENT = 2
OPERATOR = 3
NOISE = 4
TIMESTEPS = 5
VALIDATION = 6
PHASE = 7
IMAGE_NOISE = 8


def derive_seed(*keys: int, bits: int = 63) -> int:
    """A well-mixed non-negative integer below ``2**bits`` from integer ``keys``.

    Uses NumPy's ``SeedSequence`` (a hash designed for this), so nearby keys
    such as consecutive iterations give unrelated seeds.
    """
    if not keys:
        raise ValueError("derive_seed needs at least one key")
    clean = [int(k) for k in keys]
    if any(k < 0 for k in clean):
        raise ValueError(f"derive_seed keys must be non-negative integers, got {keys!r}")
    state = np.random.SeedSequence(clean).generate_state(2, np.uint32)
    value = (int(state[0]) << 32) | int(state[1])
    return value & ((1 << bits) - 1)


def generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def rows_of_rank(global_draw: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a draw made for the whole global batch (every rank draws the same from the
    same generator), so that K processes use what one process would: rows ``rank * B .. (rank + 1) * B``
    of ``world_size * B``."""
    local = global_draw.shape[0] // world_size
    return global_draw[rank * local : (rank + 1) * local]
