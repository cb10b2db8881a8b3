"""What a run ran on, in words, for provenance records and benchmark tables."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

#: CPU feature flags (``/proc/cpuinfo``) that give native bfloat16 arithmetic, and how tables name them.
BF16_CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def cpu_details(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """``["AMD EPYC", "AVX512-BF16"]``: the CPU's model name and its bfloat16 units, from ``cpuinfo``.

    Empty where the file is missing or unreadable (not Linux).
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return []
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    details = [fields["model name"]] if fields.get("model name") else []
    bf16 = [name for flag, name in BF16_CPU_FLAGS.items() if flag in flags]
    return details + bf16[:1]


def hardware_name(device: torch.device) -> str:
    """The GPU's name (``"NVIDIA H100 80GB HBM3"``), or ``"CPU, 2 cores (x86_64, AMD EPYC, AVX512-BF16)"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores ({', '.join([platform.machine(), *cpu_details()])})"
