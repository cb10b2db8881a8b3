"""Arithmetic precision of IDM inference: ``"fp32"`` or ``"bf16"``.

``"bf16"`` runs the U-Net under ``torch.autocast`` to bfloat16 while the
wired states (``x_t``, the first-level ``h_t``), the operator (``A``,
``A^+``) and the data-consistency step stay float32: autocast only lowers
convolutions and matrix products, and :mod:`idm.step` and
:mod:`idm.injector` run the operator with autocast switched off. It pays on
GPUs and on CPUs with native bfloat16 (AVX512-BF16, AMX); elsewhere oneDNN
emulates it and it can be slower than float32.
"""

from __future__ import annotations

import contextlib

import torch

#: The precisions :meth:`idm.IDM.for_inference` and the ``--precision`` flags accept.
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ValueError`` naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def autocast_for(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device_type`` (``"cpu"``, ``"cuda"``); a no-op for ``"fp32"``."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)
