"""How a task is scored and measured in benchmarks: metrics, operator draws, padding.

* CS follows the IDM authors' protocol: Y channel, images zero-padded to a
  multiple of the block, output clamped to [0, 1], x255 without rounding,
  PSNR with peak 255, SSIM (scikit-image) with data_range 255.
* Every other task scores [0, 1] images (MRI: magnitudes), clamped, with
  data_range 1.
* Image ``i`` is measured by an operator drawn with seed ``seed + i`` (modulo 2**32); with a
  trained checkpoint the operator is rebuilt from its recorded config (the
  same ``Phi`` for CS), with the user's flags on top.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch
from torch import Tensor

import operators
from idm.metrics import cs_protocol_metrics, psnr, ssim


def uses_cs_protocol(task: Any) -> bool:
    return task.operator == "cs"


def score_function(task: Any) -> Callable[[Tensor, Tensor], tuple[float, float]]:
    """``(x_hat, x) -> (psnr, ssim)`` for ``(1, C, H, W)`` images of ``task``."""
    cs_protocol = uses_cs_protocol(task)

    def score(x_hat: Tensor, x: Tensor) -> tuple[float, float]:
        estimate, reference = task.metric_image(x_hat)[0], task.metric_image(x)[0]
        if cs_protocol:
            return cs_protocol_metrics(estimate, reference)
        estimate = estimate.clamp(0, 1)
        return psnr(estimate, reference, data_range=1.0), ssim(estimate, reference, data_range=1.0)

    return score


def mean_psnr(x_hat: Tensor, x: Tensor, score: Callable[[Tensor, Tensor], tuple[float, float]] | None = None) -> float:
    """Mean PSNR (dB) over a batch of ``(B, C, H, W)`` images; ``-inf`` if ``x_hat`` is not finite (a diverged run).

    With ``score`` (:func:`score_function` of a task) each image is scored as
    ``idm benchmark`` scores it (CS protocol, MRI magnitude, clamped); without
    it, on the raw values (data range 1, unclamped), for operators of no task.
    """
    if not torch.isfinite(x_hat).all():
        return -math.inf
    if score is None:
        mse = (x_hat.double() - x.double()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-30)
        return float((-10 * torch.log10(mse)).mean())
    return statistics.fmean(score(x_hat[i : i + 1], x[i : i + 1])[0] for i in range(x.shape[0]))


def describe_protocol(task: Any) -> str:
    if uses_cs_protocol(task):
        channels = {"y": "Y", "gray": "grey", "rgb": "RGB"}.get(task.color, task.color)  # what is scored
        return f"IDM authors' CS protocol ({channels}, pad to block, clamp, x255, peak 255)"
    return "[0, 1] images" + (" (magnitude)" if task.metric == "magnitude" else "") + ", clamped, data_range 1"


def image_seed(seed: int, index: int) -> int:
    """The operator seed of image ``index``: ``seed + index``, wrapped into the seeds' range [0, 2**32)."""
    return (seed + index) % 2**32


def operator_factory(task: Any, overrides: dict[str, Any], trained_operator: dict[str, Any] | None, seed: int):
    """``(image index, (H, W)) -> operator`` seeded :func:`image_seed` ``(seed, index)``."""

    def operator_for(index: int, size: tuple[int, int]):
        if trained_operator is None:
            return task.make_operator(size, seed=image_seed(seed, index), **overrides)
        config = {**trained_operator, **overrides, "img_size": list(size)}
        if "seed" in config:
            config["seed"] = image_seed(seed, index)
        return operators.from_config(config)

    return operator_for


def pad_multiple(task: Any, op: Any) -> int | None:
    """The padding multiple of the protocol (the CS block), or ``None``."""
    return op.config().get("block") if uses_cs_protocol(task) else None
