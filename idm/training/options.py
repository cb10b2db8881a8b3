"""Checks of the options every training loop shares (``idm train`` and ``idm pretrain``)."""

from __future__ import annotations

import math
from typing import Any


def check_loop_options(owner: str, options: Any) -> None:
    """Raise ``ValueError("<owner>: ...")`` unless the shared fields of ``options`` make sense.

    Fields: ``iters``, ``batch_size``, ``lr``, ``lr_gamma``, ``seed``, ``keep``,
    ``num_workers``, ``max_minutes``.
    """

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{owner}: {message}")

    need(options.iters >= 1, f"iters must be >= 1, got {options.iters}")
    need(options.batch_size >= 1, f"batch_size must be >= 1, got {options.batch_size}")
    need(options.lr > 0 and math.isfinite(options.lr), f"lr must be a positive number, got {options.lr}")
    need(0 < options.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {options.lr_gamma}")
    need(options.seed >= 0, f"seed must be >= 0, got {options.seed}")
    need(options.keep >= 1, f"keep must be >= 1, got {options.keep}")
    need(options.num_workers >= 0, f"num_workers must be >= 0, got {options.num_workers}")
    need(options.max_minutes is None or options.max_minutes > 0, f"max_minutes must be positive, got {options.max_minutes}")
