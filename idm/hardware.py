"""What a run ran on, in words, for provenance records and benchmark tables."""

from __future__ import annotations

import os
import platform

import torch


def hardware_name(device: torch.device) -> str:
    """The GPU's name (``"NVIDIA H100 80GB HBM3"``), or ``"CPU, 2 cores (x86_64)"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores ({platform.machine()})"
