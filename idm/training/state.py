"""Optimizer and RNG state as safetensors + JSON (nothing is pickled).

An optimizer's ``state_dict()`` is split into a flat dict of tensors
(``"state.<param index>.<name>"``, e.g. Adam's ``exp_avg``, ``exp_avg_sq``
and ``step``) and a JSON-able dict (the param groups' hyperparameters and any
non-tensor per-parameter state). :func:`restore_optimizer` reverses it.

RNG state: torch's CPU generator state (a uint8 tensor), every CUDA
generator's, Python's ``random`` and NumPy's legacy global state. Training
draws its randomness from derived generators (:mod:`idm.training.seeds`), so
these are restored only so that something else touching the global RNG (a
user callback, a model with dropout) starts from the saved state on resume.
That is not a guarantee of exact draws: the data loader's start on resume
also takes a seed from torch's global generator.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from idm.checkpoint import CheckpointError, all_finite, load_json, load_tensors, save_json, save_tensors
from idm.training.optimizer import KERNEL_CHOICES

Model = TypeVar("Model")

#: The JSON file of a training checkpoint with its iteration, seconds and optimizer metadata.
TRAINER_STATE_NAME = "trainer_state.json"


def read_checkpoint_files(
    folder: Path, read_model: Callable[[Path], Model]
) -> tuple[Model, dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(read_model(folder), trainer state, optimizer tensors, RNG tensors)`` of a training checkpoint.

    Any missing or broken file raises :class:`CheckpointError` saying the
    checkpoint is damaged and how to fall back to the previous one.
    """
    with resuming_from(folder):
        model = read_model(folder)
        state = load_json(folder / TRAINER_STATE_NAME, "trainer state")
        opt_tensors = load_tensors(folder / "optimizer.safetensors")
        rng_tensors = load_tensors(folder / "rng.safetensors")
        iteration = state.get("iteration") if isinstance(state, dict) else None
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise CheckpointError(f"{folder / TRAINER_STATE_NAME} has no iteration number")
        named = re.fullmatch(r"iter_(\d+)", folder.name)
        if named and int(named.group(1)) != iteration:
            raise CheckpointError(f"{folder / TRAINER_STATE_NAME} says iteration {iteration}, its folder {folder.name}")
        seconds = state.get("seconds", 0.0)
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
            raise CheckpointError(f"{folder / TRAINER_STATE_NAME} has no valid training time (seconds: {seconds!r:.40})")
        broken = [k for k, v in opt_tensors.items() if not all_finite(v)]
        if broken:
            raise CheckpointError(f"the optimizer state in {folder / 'optimizer.safetensors'} holds NaN or inf ({broken[0]})")
        optimizer = state.get("optimizer")
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"]
        ):
            raise CheckpointError(f"{folder / TRAINER_STATE_NAME} has no readable optimizer record (param_groups)")
    return model, state, opt_tensors, rng_tensors


@contextlib.contextmanager
def resuming_from(folder: Path) -> Iterator[None]:
    """A :class:`CheckpointError` inside (reading the checkpoint ``folder``, or restoring its optimizer and RNG
    state) says that the checkpoint is damaged and how to fall back to the previous one."""
    try:
        yield
    except CheckpointError as err:
        raise CheckpointError(
            f"cannot resume from {str(folder)!r}: {err}\n(the checkpoint is damaged; delete that folder to resume "
            "from the previous checkpoint, if any; nothing was overwritten)"
        ) from None


def write_trainer_state(
    folder: Path, optimizer: torch.optim.Optimizer, iteration: int, seconds: float, world_size: int, **extra: Any
) -> None:
    """Write the trainer's part of a checkpoint into ``folder``, as :func:`read_checkpoint_files` reads it.

    ``optimizer.safetensors`` and ``rng.safetensors`` (:func:`flatten_optimizer`,
    :func:`capture_rng`), and ``trainer_state.json`` with ``iteration``,
    ``seconds`` (of training so far), ``world_size``, the torch version, the
    optimizer and RNG metadata and any JSON-able ``extra`` entries.
    """
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    save_tensors(opt_tensors, folder / "optimizer.safetensors")
    rng_tensors, rng_meta = capture_rng()
    save_tensors(rng_tensors, folder / "rng.safetensors")
    state = {
        "iteration": iteration,
        "seconds": seconds,
        **extra,
        "optimizer": opt_meta,
        "rng": rng_meta,
        "world_size": world_size,
        "torch": torch.__version__,
    }
    save_json(state, folder / TRAINER_STATE_NAME)


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` with everything of ``optimizer.state_dict()``."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"type": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load what :func:`flatten_optimizer` produced into ``optimizer`` (same parameter layout); a record that
    is not of that form (a hand-edited ``trainer_state.json``) is a :class:`CheckpointError`."""
    try:
        _restore_optimizer(optimizer, tensors, meta)
    except CheckpointError:
        raise
    except (TypeError, AttributeError, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"the optimizer record in the checkpoint is malformed: {type(err).__name__}: {err}") from None


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if meta.get("type") != type(optimizer).__name__:
        raise CheckpointError(f"the checkpoint holds a {meta.get('type')} state, not {type(optimizer).__name__}")
    current = optimizer.param_groups
    groups = meta["param_groups"]
    if len(groups) != len(current) or any(len(g["params"]) != len(c["params"]) for g, c in zip(groups, current)):
        raise CheckpointError("the optimizer state in the checkpoint has a different parameter layout")
    fixed = []
    for saved, live in zip(groups, current):
        group = {k: (tuple(v) if isinstance(live.get(k), tuple) else v) for k, v in saved.items()}
        # how to compute (fused kernel or not) belongs to this device, not to the saved state
        group.update({k: live[k] for k in KERNEL_CHOICES if k in live})
        fixed.append(group)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    _check_state_fits(optimizer, state)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": fixed})
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"the optimizer state in the checkpoint does not fit: {err}") from None


#: What Adam keeps per parameter; a state without one of them would fail at the first step.
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _check_state_fits(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Any]]) -> None:
    """A :class:`CheckpointError` now, rather than a failure deep in the first step, for a saved state whose
    moments have another shape than their parameter or that lacks what Adam keeps."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():
        if not 0 <= index < len(params):
            raise CheckpointError(f"the optimizer state in the checkpoint names parameter {index} of {len(params)}")
        missing = [k for k in _ADAM_STATE if k not in entry] if isinstance(optimizer, torch.optim.Adam) else []
        wrong = [k for k, v in entry.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape != params[index].shape]
        if missing or wrong:
            problem = f"lacks {', '.join(missing)}" if missing else f"has {wrong[0]} of shape {tuple(entry[wrong[0]].shape)}"
            raise CheckpointError(
                f"the optimizer state in the checkpoint does not fit: parameter {index} (shape "
                f"{tuple(params[index].shape)}) {problem}"
            )


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)``: torch CPU/CUDA generator states, Python and NumPy global RNG states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only for devices that exist); a damaged state is a
    :class:`CheckpointError`."""
    try:
        _restore_rng(tensors, meta)
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"the random generators' state in the checkpoint is damaged: {err}") from None


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda_{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda_{i}"].to(torch.uint8), i)
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        kind, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
