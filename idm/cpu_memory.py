"""Keep freed tensor memory inside the process on glibc, so CPU runs stop faulting in fresh pages.

An IDM forward on the CPU allocates and frees hundreds of feature maps of a
few to a few tens of MiB (at 256x256, one 128-channel float32 map is 32 MiB).
glibc's ``malloc`` serves blocks above its mmap threshold (128 KiB, growing
to at most 32 MiB) with a fresh ``mmap`` and hands them back to the kernel on
``free``, and trims the heap top above 128 KiB, so every step's tensors land
on pages the kernel must zero and map again. For ``cs-10`` at 256x256 on a
2-core CPU that is 90,000-110,000 minor page faults and 0.2-0.3 s of system
time per forward, and the median forward falls from 1100 to 965 ms in fp32
(850 to 694 ms in bf16) on an AVX512-BF16 EPYC, from 1276 to 1131 ms on an
AVX2 one, when freed memory is kept (``python -m benchmarks.cpu_malloc``,
``benchmarks/results/cpu/malloc*``). A run whose large early allocations
already raised glibc's threshold (CT's projector matrices) has nothing left
to gain.

:func:`keep_freed_memory` raises both thresholds so freed blocks stay in the
heap for the next step, which is what PyTorch's CPU performance guide gets
by preloading jemalloc or tcmalloc, with nothing to install. The cost: the
process keeps its peak heap instead of returning it between steps. It does
nothing off glibc, and nothing when the user has tuned glibc's ``malloc``
through its own environment variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``), so ``MALLOC_MMAP_THRESHOLD_=131072 idm ...``
runs with glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: ``mallopt`` parameters (glibc's ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Environment variables through which glibc's own tuning is set; when one is, it wins.
GLIBC_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

#: The largest block kept in the heap, and the free heap top kept untrimmed (bytes).
DEFAULT_KEPT_BYTES = 1 << 30


def keep_freed_memory(kept_bytes: int = DEFAULT_KEPT_BYTES) -> bool:
    """Have glibc keep freed blocks up to ``kept_bytes`` (and that much free heap top) for reuse.

    Process-wide, for the rest of the process. Returns whether the settings
    were applied: False off glibc, when one of :data:`GLIBC_MALLOC_VARIABLES`
    is set (the user's tuning is left alone), or when glibc's ``mallopt``
    refuses the values (glibc 2.36 takes 1 GiB).
    """
    if kept_bytes <= 0 or kept_bytes >= 1 << 31:
        raise ValueError(f"kept_bytes must be in (0, 2 GiB) for mallopt's int argument, got {kept_bytes}")
    if any(name in os.environ for name in GLIBC_MALLOC_VARIABLES):
        return False
    libc = glibc()
    if libc is None:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, kept_bytes) == 1 and libc.mallopt(M_TRIM_THRESHOLD, kept_bytes) == 1


def glibc() -> ctypes.CDLL | None:
    """This process's glibc (for ``mallopt``, ``malloc_trim``), or ``None`` off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    libc_path = ctypes.util.find_library("c")
    return None if libc_path is None else ctypes.CDLL(libc_path)
