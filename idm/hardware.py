"""What a run ran on, in words, for provenance records and benchmark tables."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

#: CPU feature flags (``/proc/cpuinfo``) that give native bfloat16 arithmetic, and how tables name them.
BF16_CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def _cpuinfo_fields(cpuinfo: str | Path) -> dict[str, str]:
    """The first processor's ``key: value`` fields of ``cpuinfo``; empty where it is missing or unreadable."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def _bf16_units(fields: dict[str, str]) -> list[str]:
    flags = set(fields.get("flags", "").split())
    return [name for flag, name in BF16_CPU_FLAGS.items() if flag in flags]


def cpu_bf16_units(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """``["AVX512-BF16"]``: the CPU's native bfloat16 units (:data:`BF16_CPU_FLAGS`); empty where it has none.

    Empty too where ``cpuinfo`` is missing or unreadable (not Linux): callers then assume none.
    """
    return _bf16_units(_cpuinfo_fields(cpuinfo))


def cpu_details(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """``["AMD EPYC 9554", "AVX512-BF16"]``: the CPU's model name and its bfloat16 units, from ``cpuinfo``.

    A model name without a number (virtual machines often show ``"AMD EPYC"``
    for every generation) is followed by the processor's family and model
    numbers (``"family 26 model 2"``), which tell the generations apart: two
    such machines ran the same model 2.7x apart (``benchmarks/SPEED.md``).
    Empty where the file is missing or unreadable (not Linux).
    """
    fields = _cpuinfo_fields(cpuinfo)  # read once for all
    model = fields.get("model name")
    details = [model] if model else []
    family, number = fields.get("cpu family"), fields.get("model")
    named = re.sub(r"@\s*[\d.]+\s*[GM]Hz", "", model or "")  # "Intel(R) Xeon(R) CPU @ 2.20GHz": a clock, no model
    if named and not any(char.isdigit() for char in named) and family and number:
        details.append(f"family {family} model {number}")
    return details + _bf16_units(fields)[:1]


def has_native_bf16(device: torch.device, cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether ``device`` computes in bfloat16 natively rather than by emulation.

    CUDA: compute capability 8.0 or newer (``torch.cuda.is_bf16_supported`` without emulation).
    CPU: AVX512-BF16 or AMX-BF16 in ``cpuinfo``; oneDNN emulates bfloat16 elsewhere, slower than
    float32 (``benchmarks/SPEED.md``, *On this CPU*). Other devices: ``False``.
    """
    if device.type == "cuda":  # compute capability 8.0+: what is_bf16_supported checks, here for this device
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(cpu_bf16_units(cpuinfo))
    return False


def hardware_name(device: torch.device) -> str:
    """The GPU's name (``"NVIDIA H100 80GB HBM3"``), or ``"CPU, 2 cores (x86_64, AMD EPYC, AVX512-BF16)"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores ({', '.join([platform.machine(), *cpu_details()])})"
