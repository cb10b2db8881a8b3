"""Train one IDM variant with a fixed budget, then score it: the unit of the ablation and scaling scripts.

A :class:`Variant` is a set of :class:`idm.IDMConfig` changes plus two
switches: ``random_init`` (the prior's architecture with fresh weights: no
weight reuse) and ``end_to_end`` (``False``: no training at all, the prior
runs as DDNM). :func:`run_variant` trains it with :func:`idm.train.train`
(same data, operator, budget and seed for every variant), measures training
time and peak training memory (CUDA only), and scores the result on test
images with the benchmark harness (same protocol as ``idm benchmark``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.harness import BenchmarkImage, run_benchmark
from benchmarks.idm_method import IDMMethod
from benchmarks.protocol import operator_factory, pad_multiple, score_function
from idm import IDMConfig
from idm.train import TrainConfig, load_trained, train
from idm.unets import PRIOR_INFO_NAME, load_unet_folder


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: a name, IDM config changes, and the two switches above."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False
    end_to_end: bool = True
    description: str = ""


def random_copy_of_prior(prior: str | Path, out: Path, seed: int) -> Path:
    """Save the prior's architecture with fresh random weights (and its range file) to ``out``."""
    unet = load_unet_folder(prior)
    torch.manual_seed(seed)
    fresh = type(unet).from_config(unet.config)
    fresh.save_pretrained(out)
    info = Path(prior) / PRIOR_INFO_NAME
    if info.is_file():
        (out / PRIOR_INFO_NAME).write_text(info.read_text())
    return out


def evaluate(method: Any, task: Any, images: Sequence[BenchmarkImage], trained_operator: dict | None,
             overrides: dict[str, Any], device: torch.device, seed: int) -> dict[str, Any]:
    """Mean PSNR/SSIM/seconds of ``method`` on ``images`` under the task's protocol."""
    operator_for = operator_factory(task, overrides, trained_operator, seed)
    first = operator_for(0, tuple(images[0].x.shape[-2:]))
    rows = run_benchmark(images, [method], operator_for, score_function(task), display=task.metric_image,
                         device=device, out=None, seed=seed, pad_multiple=pad_multiple(task, first), progress=False)
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise RuntimeError(f"{method.name} failed on every test image: {rows[0].get('error')}")
    return {
        "psnr": statistics.fmean(r["psnr"] for r in ok),
        "ssim": statistics.fmean(r["ssim"] for r in ok),
        "inference_seconds": statistics.fmean(r["seconds"] for r in ok),
        "nfe": method.nfe,
        "test_images": len(ok),
    }


def run_variant(
    variant: Variant,
    *,
    task: Any,
    prior: str,
    train_data: Sequence[str],
    images: Sequence[BenchmarkImage],
    overrides: dict[str, Any],
    base_model: IDMConfig,
    budget: TrainConfig,
    crop: int,
    out: Path,
    device: torch.device,
    ddnm_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (unless ``end_to_end=False``) and score one variant; returns one table row."""
    row: dict[str, Any] = {"variant": variant.name, "description": variant.description}
    if not variant.end_to_end:
        from benchmarks.methods import make_method
        from benchmarks.prior import load_prior

        method = make_method("ddnm", prior=load_prior(prior, device=device), progress=False, **(ddnm_options or {}))
        row.update(train_seconds=0.0, train_memory_mb=None, iterations=0)
        row.update(evaluate(method, task, images, None, overrides, device, budget.seed))
        return row
    folder = out / variant.name
    unet = str(random_copy_of_prior(prior, folder / "random_prior", budget.seed)) if variant.random_init else prior
    model_config = replace(base_model, unet=unet, **variant.model)
    dataset = task.dataset(list(train_data), crop=crop, augment=False, seed=budget.seed)  # train() flips whole batches, as idm train
    operator = task.make_operator((crop, crop), seed=budget.seed, **overrides)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = train(model_config, dataset, operator, folder / "run", budget, task=task.name,
                   task_info=task.describe(), device=device, say=lambda message: None)
    row["train_seconds"] = time.perf_counter() - start
    row["train_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    row["iterations"] = result.iteration
    trained = load_trained(result.checkpoint, device=device)
    row.update(evaluate(IDMMethod(trained.model), task, images, trained.operator, overrides, device, budget.seed))
    return row
