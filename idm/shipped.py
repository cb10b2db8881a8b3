"""Shipped (pretrained) IDM models: the checkpoint ``idm reconstruct`` / ``benchmark`` / ``demo`` use
without ``--checkpoint``.

    from idm.shipped import default_checkpoint, shipped_models
    folder = default_checkpoint("cs", {"name": "cs", "ratio": 0.1, "mode": "permuted", "block": 32})
    # -> Path of the model folder that serves this request, or None

The weights live in the package, in ``idm/weights/<name>/`` (fp16
safetensors, see ``idm/weights/README.md`` for how each was trained). Every
shipped model is an ordinary IDM model folder written by ``idm train``
(``config.json``, ``model.safetensors`` and ``run.json`` with the task and the
training operator), so what it serves is read from the folder itself: a
request matches when the task is the same and the recorded operator, or
operator family (e.g. every CS ratio from 1% to 50%), covers every requested
setting (:func:`operators.family.config_mismatches`). When several serve it,
a model trained for exactly that operator (e.g. ``cs-10``, CS at 10 % only)
is preferred over one trained on a family that contains it
(``cs-ratio-1-50``), and among families the one whose training drew that
kind of operator most often (:func:`operators.family.serving_share`: a model
of random masks alone over one that drew a box in two draws of three).

``$IDM_MODELS_DIR`` names a folder of further model folders (e.g. larger
GPU-trained ones); they are searched first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from idm.checkpoint import CheckpointError, load_json
from idm.training.run_folder import RUN_NAME
from idm.unets import BUILT_IN_UNETS
from operators.family import config_mismatches, is_family_config, serving_share

#: Environment variable naming a folder of extra model folders, searched before the shipped ones.
MODELS_ENV = "IDM_MODELS_DIR"
#: The folder inside the package that holds the shipped model folders.
PACKAGED_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ShippedModel:
    """A model folder and what it was trained for (from its ``run.json``)."""

    path: Path
    task: str
    operator: Mapping[str, Any]
    run: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def trained_on_family(self) -> bool:
        """Whether it was trained on a family of operators (e.g. a range of CS ratios) rather than one."""
        return is_family_config(self.operator)

    @property
    def color(self) -> str | None:
        """The colour mode of the images it was trained on (``"y"``, ``"rgb"``...), when recorded."""
        return self.run.get("identity", {}).get("task_info", {}).get("color")

    @property
    def channels(self) -> int | None:
        """The image channels it reconstructs (1: grey / Y, 2: MRI, 3: RGB), when recorded."""
        return self.run.get("identity", {}).get("task_info", {}).get("channels")

    def mismatches(self, task: str, request: Mapping[str, Any], channels: int | None = None) -> list[str]:
        """Why this model cannot serve ``task`` with operator ``request`` on ``channels``-channel images
        (``None``: any); ``[]`` when it can."""
        if task != self.task:
            return [f"trained for task {self.task!r}"]
        if channels is not None and self.channels is not None and channels != self.channels:
            return [f"reconstructs {self.channels}-channel images, not {channels}"]
        return config_mismatches(self.operator, request)

    def serves(self, task: str, request: Mapping[str, Any], channels: int | None = None) -> bool:
        """Whether this model was trained for ``task``, an operator covering ``request`` and, when
        ``channels`` is given, images of that many channels."""
        return not self.mismatches(task, request, channels)


def search_dirs() -> list[Path]:
    """Where model folders are looked for: ``$IDM_MODELS_DIR`` (when set), then the packaged weights."""
    env = os.environ.get(MODELS_ENV)
    return ([Path(env).expanduser()] if env else []) + [PACKAGED_DIR]


def shipped_models() -> list[ShippedModel]:
    """Every model folder under :func:`search_dirs` with a readable ``run.json``, in name order per folder."""
    models = []
    for root in search_dirs():
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if (p / RUN_NAME).is_file()):
            try:
                run = load_json(folder / RUN_NAME, "run config")
                identity = run["identity"]
                models.append(ShippedModel(folder, identity["task"], identity["operator"], run))
            except (CheckpointError, KeyError, TypeError):
                continue  # not a model folder of ours: skip it rather than fail every command
    return models


def shipped_priors() -> list[Path]:
    """Every diffusion prior folder under :func:`search_dirs` (a diffusers U-Net folder written by ``idm
    pretrain`` / ``idm export``, with ``idm_prior.json``), in name order per folder: what ``--prior NAME`` finds."""
    from idm.unets.factory import is_prior_folder

    priors = []
    for root in search_dirs():
        if root.is_dir():
            priors += sorted(p for p in root.iterdir() if is_prior_folder(p))
    return priors


def find_shipped(task: str, operator_config: Mapping[str, Any], channels: int | None = None) -> ShippedModel | None:
    """The shipped model that serves ``task`` with ``operator_config`` (on ``channels``-channel images when
    given), or ``None``.

    Folders of ``$IDM_MODELS_DIR`` come first; within one folder, a model
    trained for exactly the requested operator comes before one trained on a
    family containing it, a family that drew the requested kind of operator
    in a larger share of its training before one that drew it less often
    (:func:`operators.family.serving_share`), then name order decides.

    Args:
        task: task name (``"cs"``, ``"inpainting"``...).
        operator_config: the requested operator settings, e.g. ``op.config()``
            or ``{"name": "cs", "ratio": 0.1, ...}`` (``img_size`` and ``seed``
            are not compared).
        channels: the task's image channels (``Task.channels``): a model of another colour mode
            (a grey inpainting model for RGB images) does not serve.
    """
    roots = [root.resolve() for root in search_dirs()]
    serving = [model for model in shipped_models() if model.serves(task, operator_config, channels)]
    if not serving:
        return None
    return min(serving, key=lambda m: (roots.index(m.path.parent.resolve()), m.trained_on_family,
                                       -serving_share(m.operator, operator_config), m.name))  # fmt: skip


def default_checkpoint(task: str, operator_config: Mapping[str, Any], channels: int | None = None) -> Path | None:
    """The folder of :func:`find_shipped`'s model, or ``None``."""
    model = find_shipped(task, operator_config, channels)
    return None if model is None else model.path


def model_path(name_or_path: str) -> str | Path:
    """The folder of the shipped model called ``name_or_path`` when no such path exists; else the path as given."""
    if Path(name_or_path).exists():
        return name_or_path
    return next((m.path for m in shipped_models() if m.name == name_or_path), name_or_path)


def find_prior(name: str) -> Path | None:
    """The diffusion prior a model records as its ``unet``: that folder when it exists, else a folder of
    that name under :func:`search_dirs` (shipped models record the name of the prior shipped beside them)."""
    if name in BUILT_IN_UNETS:
        return None
    if Path(name).is_dir():
        return Path(name)
    return next((root / name for root in search_dirs() if (root / name / "config.json").is_file()), None)


def describe_request(task: str, operator_config: Mapping[str, Any]) -> str:
    """``"task 'cs' (ratio=0.1, block=32, mode='permuted')"``: the request, for messages."""
    shown = {k: v for k, v in operator_config.items() if k not in ("name", "img_size", "seed", "columns", "mask", "channels")}
    if isinstance(operator_config.get("mask"), str):
        shown = {"mask": operator_config["mask"], **shown}
    settings = ", ".join(f"{k}={v!r}" for k, v in shown.items())
    return f"task {task!r}" + (f" ({settings})" if settings else "")


def missing_message(task: str, operator_config: Mapping[str, Any], channels: int | None = None) -> str:
    """The error shown when no shipped model serves a request: each model of the task says why not."""
    models = shipped_models()
    available = [f"{m.name} ({m.task})" for m in models]
    why = "".join(f"; {m.name}: {'; '.join(m.mismatches(task, operator_config, channels))}" for m in models if m.task == task)
    return (
        f"no shipped model serves {describe_request(task, operator_config)}{why}; "
        f"shipped: {', '.join(available) or 'none'}; pass --checkpoint DIR "
        "(an IDM model folder or an `idm train` --out folder)"
    )
