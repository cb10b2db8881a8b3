"""Arithmetic precision of IDM inference: ``"fp32"`` or ``"bf16"``.

``"bf16"`` runs the U-Net under ``torch.autocast`` to bfloat16 while the
wired states (``x_t``, the first-level ``h_t``), the operator (``A``,
``A^+``) and the data-consistency step stay float32: autocast only lowers
convolutions and matrix products, and :mod:`idm.step` and
:mod:`idm.injector` run the operator with autocast switched off. The U-Net's
first and last layers stay float32 too (:func:`full_precision`): its input
state is not rounded to bfloat16, nor its noise estimate, which the DDNM step
divides by ``sqrt(abar_t)``. On Set11 that cuts the bf16 path's mean PSNR
loss with the shipped ``cs-10`` and ``cs-30`` to about a third, within
0.05 dB of float32 (``benchmarks/SPEED.md``, *On this CPU*), at the cost of two thin
convolutions (the image side of the U-Net) in float32. The same holds under
the bf16 autocast of training on CUDA. It pays on
GPUs and on CPUs with native bfloat16 (AVX512-BF16, AMX); elsewhere oneDNN
emulates it and it can be slower than float32. ``"auto"`` picks ``"bf16"``
exactly where the device has it natively (:func:`resolve_precision`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch import Tensor

from idm import hardware

#: The precisions a model runs in.
PRECISIONS = ("fp32", "bf16")

#: What :meth:`idm.IDM.for_inference` and the ``--precision`` flags accept: a precision, or ``"auto"``.
PRECISION_CHOICES = ("auto", *PRECISIONS)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ValueError`` naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bf16"`` where ``device`` has native bfloat16 (:func:`idm.hardware.has_native_bf16`), else ``"fp32"``.

    A precision of :data:`PRECISIONS` is returned as it is; anything else is a ``ValueError``.
    On the shipped models bf16 stays within 0.03 dB of fp32 in mean PSNR on every
    benchmark that was run in both (``benchmarks/SPEED.md``, *On this CPU*).
    """
    if precision == "auto":
        return "bf16" if hardware.has_native_bf16(torch.device(device)) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}; got {precision!r}")
    return precision


def training_precision(precision: str, device: torch.device | str) -> str:
    """The arithmetic of a training run (``idm train``, ``idm pretrain``): ``"fp32"`` or ``"bf16"``.

    ``precision`` is one of :data:`PRECISION_CHOICES`. ``"auto"`` -> ``"bf16"`` on CUDA, ``"fp32"`` on
    the CPU and other devices. Unlike inference's ``"auto"`` (:func:`resolve_precision`), it keeps
    float32 on CPUs with native bfloat16: there bf16 trains 1.2-1.7x faster (AMX; README, *Fine-tuning
    IDM*) but rounds every step of a long run, so it is asked for explicitly (``"bf16"``), and the CPU
    runs recorded in the README stay reproducible. bf16 on a device without native bfloat16 (a GPU before
    Ampere, a CPU without AVX512-BF16 or AMX) runs, with a warning that float32 may be faster there.
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}; got {precision!r}")
    device = torch.device(device)
    resolved = ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision
    if resolved == "bf16" and not hardware.has_native_bf16(device):
        warnings.warn(f"bf16 training on {hardware.hardware_name(device) if device.type in ('cpu', 'cuda') else device}, "
                      "which has no native bfloat16: float32 (--precision fp32) may train faster here", stacklevel=2)  # fmt: skip
    return resolved


def autocast_for(device_type: str, precision: str, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device_type`` (``"cpu"``, ``"cuda"``); a no-op for ``"fp32"``.

    ``cache_enabled=False`` casts weights anew at every use instead of once per autocast region: what a
    region captured as a CUDA graph needs (torch's CUDA graphs notes).
    """
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=cache_enabled)


def full_precision(layer: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``layer(x)`` with autocast switched off and ``x`` in at least float32; plain ``layer(x)`` outside autocast.

    For the layers whose rounding the network amplifies (:class:`idm.unets.wired_unet.WiredUNet`'s
    ``conv_in`` and ``conv_out``). The output has ``x``'s dtype or float32, whichever is wider.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return layer(x)
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.to(torch.promote_types(x.dtype, torch.float32)))
