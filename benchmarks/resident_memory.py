"""Peak resident memory of a block of code on the CPU (Linux), for ``idm benchmark``'s memory column.

    if resident_memory.available():
        with ResidentPeak() as peak:
            x_hat = method(y, op)
        peak.mib          # the process's peak resident set during the block, above what was resident before it

On the GPU the benchmark reads ``torch.cuda.max_memory_allocated``; the CPU has no such counter. The kernel
keeps one per process instead: the high-water mark of the resident set (``VmHWM`` in ``/proc/self/status``),
which writing ``5`` to ``/proc/self/clear_refs`` resets to the current resident set (Linux 4.0 and later; see
``man 5 proc``). Before the block the heap's freed memory is handed back to the kernel (glibc's
``malloc_trim``): ``idm`` keeps freed memory in the heap (:mod:`idm.cpu_memory`), and a method that reused
what an earlier one freed would otherwise seem to need nothing.

What is measured is the pages the block first touches, by any thread of the process: tensors, the operator's
caches, the interpreter's objects, and whatever another thread allocates meanwhile. It is a guide to a
method's working memory, not an exact count like CUDA's allocator statistics: where the allocator places
blocks (the main heap or a thread's arena, which ``malloc_trim`` hands back only in part) moves it by tens
of MiB between identical calls, and with the thread count.
"""

from __future__ import annotations

from pathlib import Path

import torch

from idm.cpu_memory import glibc

__all__ = ["ResidentPeak", "available", "measured_on"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or ``None`` where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak() -> bool:
    """Reset the process's resident high-water mark to its current resident set; whether the kernel took it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def available() -> bool:
    """Whether this system can measure a block's peak resident memory (Linux with ``/proc``)."""
    return _status_kib("VmHWM") is not None and _status_kib("VmRSS") is not None and _reset_peak()


def measured_on(device: torch.device) -> bool:
    """Whether ``idm benchmark`` measures resident memory for methods run on ``device``: the CPU, where
    :func:`available`."""
    return device.type == "cpu" and available()


def _release_freed_heap() -> None:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim(0)``; nothing elsewhere)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


class ResidentPeak:
    """Context manager: :attr:`mib` is the peak resident memory of the block above what was resident when it
    began, in MiB (``None`` until the block ends, or where :func:`available` is false)."""

    def __init__(self) -> None:
        self.mib: float | None = None
        self._before: int | None = None

    def __enter__(self) -> "ResidentPeak":
        _release_freed_heap()
        self._before = _status_kib("VmRSS") if _reset_peak() else None
        return self

    def __exit__(self, *exc_info) -> bool:
        peak = _status_kib("VmHWM")
        if self._before is not None and peak is not None:
            self.mib = max(0, peak - self._before) / 1024
        return False
