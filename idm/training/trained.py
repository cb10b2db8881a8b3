"""Trained IDMs as models: a training ``--out`` folder or a checkpoint, with what it was trained for.

    from idm.train import load_trained          # (re-exported there)
    trained = load_trained("runs/cs10", expect_task="cs", expect_operator={"ratio": 0.1})
    trained.model, trained.operator, trained.trained_on_family

For ``idm reconstruct`` / ``idm benchmark``: :func:`resolve_model_dir` turns
a model folder or a run folder into the model folder to load, and
:func:`load_trained` refuses a checkpoint trained for another task or
operator with a message naming the differences.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from idm.checkpoint import CheckpointError, load_json
from idm.model import CONFIG_NAME, FORMAT as MODEL_FORMAT, IDM, WEIGHTS_NAME
from idm.training.run_folder import RUN_NAME, RunFolder
from operators.family import config_mismatches, is_family_config, representative_config

#: ``format`` of an ``idm train`` run config (``OUT/config.json``, ``run.json`` in checkpoints).
RUN_FORMAT = "idm-train-run"


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` is an IDM model folder (``config.json`` of the IDM model format + ``model.safetensors``)."""
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        return False
    try:
        return load_json(path / CONFIG_NAME).get("format") == MODEL_FORMAT
    except (CheckpointError, AttributeError):
        return False


def _why_not_a_model(folder: Path) -> str:
    """What keeps ``folder`` (a checkpoint of a training run) from being an IDM model folder, in words."""
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        return f"it lacks {' and '.join(missing)}; the checkpoint is damaged"
    try:
        config = load_json(folder / CONFIG_NAME)
    except CheckpointError as err:
        return f"{err}; the checkpoint is damaged"
    kind = config.get("format") if isinstance(config, dict) else None
    return f"its {CONFIG_NAME} is of format {kind!r}, not {MODEL_FORMAT!r}"


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The IDM model folder meant by ``path``.

    Accepts a model folder (``config.json`` + ``model.safetensors`` as
    written by :meth:`IDM.save_pretrained`, which every training checkpoint
    is), a training ``--out`` folder (its latest checkpoint), or the name of
    a shipped model (``"mri-4x"``; a path of that name wins).
    Raises :class:`CheckpointError` otherwise.
    """
    from idm.shipped import model_path, shipped_priors  # a shipped model's name, when no such path exists

    p = Path(model_path(str(path)))
    if not p.exists():
        if any(prior.name == str(path) for prior in shipped_priors()):
            raise CheckpointError(f"{str(path)!r} is a shipped diffusion prior, not an IDM model: "
                                  "pass it as --prior (idm train, idm benchmark)")  # fmt: skip
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist, nor is it the name of a shipped model (`idm info` lists them)")
    if p.is_dir() and is_model_dir(p):
        return p
    from idm.pretrain import is_pretrain_run

    if p.is_dir() and is_pretrain_run(p):
        raise CheckpointError(f"{str(p)!r} is an `idm pretrain` run, a diffusion prior, not an IDM model: pass it as "
                              "--prior (idm train, idm benchmark)")  # fmt: skip
    from idm.unets.factory import is_prior_folder

    if p.is_dir() and is_prior_folder(p):
        raise CheckpointError(f"{str(p)!r} is a diffusion prior, not an IDM model: pass it as --prior (idm train, "
                              "idm benchmark)")  # fmt: skip
    if p.is_dir() and p.parent.name == "checkpoints" and is_pretrain_run(p.parent.parent):
        raise CheckpointError(f"{str(p)!r} is a checkpoint of an `idm pretrain` run, not an IDM model: pass the run as "
                              "--prior (idm train, idm benchmark), which stands for its prior/ as last exported")  # fmt: skip
    if p.is_dir() and (p / "checkpoints").is_dir():
        latest = RunFolder(p, RUN_FORMAT).latest()
        if latest is None:
            raise CheckpointError(f"training folder {str(p)!r} has no checkpoint yet")
        if not is_model_dir(latest):
            raise CheckpointError(f"the latest checkpoint {str(latest)!r} is not an IDM model folder: {_why_not_a_model(latest)}")
        if not (latest / RUN_NAME).is_file():  # read as a bare model, it would serve any task and operator
            raise CheckpointError(f"the latest checkpoint {str(latest)!r} lacks {RUN_NAME}, the record of its task and "
                                  "operator: the checkpoint is damaged; delete that folder to use the previous one, if any")  # fmt: skip
        return latest
    raise CheckpointError(
        f"{str(p)!r} is neither an IDM model folder (config.json + model.safetensors) "
        "nor a training --out folder (with checkpoints/)"
    )


def read_run_record(folder: Path) -> dict[str, Any] | None:
    """The ``run.json`` of a model folder (``None`` for a bare one without it), checked to be an ``idm train``
    run config whose identity maps task and operator settings; a :class:`CheckpointError` otherwise."""
    if not (folder / RUN_NAME).is_file():
        return None
    run = load_json(folder / RUN_NAME, "run config")
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{folder / RUN_NAME} is not an idm train run config")
    identity = run.get("identity", {})
    if not isinstance(identity, dict) or not isinstance(identity.get("operator", {}), dict):
        raise CheckpointError(f"{folder / RUN_NAME} is damaged: its 'identity' must map task and operator settings")
    return run


def _recorded_text(path: str | os.PathLike, *keys: str) -> str | None:
    """The non-empty string that the ``run.json`` of a checkpoint (see :func:`resolve_model_dir`) records under
    the nested ``keys``, read without loading the weights; ``None`` where there is none (a bare model folder,
    an entry that is absent or not a string)."""
    value: Any = read_run_record(resolve_model_dir(path))
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) and value else None


def recorded_task(path: str | os.PathLike) -> str | None:
    """The task that the run of a checkpoint was trained for; ``None`` for a bare model folder."""
    return _recorded_text(path, "identity", "task")


def recorded_color(path: str | os.PathLike) -> str | None:
    """The colour mode (``--color``) that the run of a checkpoint read its images in; ``None`` when it records
    none (a bare model folder, a run started from Python without one)."""
    return _recorded_text(path, "identity", "task_info", "color")


def recorded_task_package(path: str | os.PathLike) -> str | None:
    """The installed package (``"<distribution> <version>"``) that provided the plug-in task of a checkpoint's run;
    ``None`` for the toolkit's own tasks and for runs that record none."""
    return _recorded_text(path, "settings", "task_package")


@dataclass
class TrainedModel:
    """A loaded model with the metadata of the run that trained it (``run`` is ``None`` for bare model folders)."""

    model: IDM
    path: Path
    run: dict[str, Any] | None = None
    operator_defaults: dict[str, Any] | None = None

    @property
    def task(self) -> str | None:
        return None if self.run is None else self.run.get("identity", {}).get("task")

    @property
    def recorded_operator(self) -> dict[str, Any] | None:
        """The training operator's config as recorded: one operator, or an operator family."""
        return None if self.run is None else self.run.get("identity", {}).get("operator")

    @property
    def foreign_operator(self) -> str | None:
        """The class name of a training operator that is not one of the toolkit's (a deepinv physics given
        to :func:`idm.train.train`: only its class is recorded), else ``None``."""
        recorded = self.recorded_operator
        if recorded is None or "name" in recorded:  # a toolkit operator or family, or no run record
            return None
        return str(recorded.get("class", "unrecorded"))

    @property
    def operator(self) -> dict[str, Any] | None:
        """The config of the operator this model serves by default (``operators.from_config`` rebuilds
        it; same ``Phi`` for CS): the training operator, or for a model trained on a family, the
        family's first member with :attr:`operator_defaults` (the task's defaults) on top for the
        settings the family varies, where the family covers them (a setting it was trained with at
        one value, such as a CS block of 8, keeps that value)."""
        recorded = self.recorded_operator
        if self.foreign_operator is not None:
            return None  # nothing operators.from_config could rebuild
        if not is_family_config(recorded):
            return recorded
        member = representative_config(recorded)
        varied = {key for component in recorded.get("components", []) for key in dict(component).get("vary", {})}
        defaults = {k: v for k, v in (self.operator_defaults or {}).items() if k in varied}
        with_defaults = {**member, **defaults}
        return with_defaults if not config_mismatches(recorded, with_defaults) else member

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(H, W)`` of the training operator (its ``img_size``), when the run recorded one."""
        size = (self.operator or {}).get("img_size")
        return None if size is None else (int(size[0]), int(size[1]))

    def size_warning(self, img_size: tuple[int, int]) -> str | None:
        """A warning when ``img_size`` is not the training size (for tasks whose models are size-bound)."""
        trained = self.image_size
        if trained is None or tuple(img_size) == trained:
            return None
        return (
            f"{self.path} was trained on {trained[0]}x{trained[1]} images, these are "
            f"{img_size[0]}x{img_size[1]}; its {self.task or 'task'} model is tied to its training size and may "
            f"do worse than the pseudo-inverse here. Resize the images to {trained[0]}x{trained[1]} (--size {trained[0]} "
            f"in idm simulate, idm reconstruct and idm benchmark) or train at this size."
        )

    def phase_warning(self) -> str | None:
        """A warning for reconstructing real k-space (complex images with a phase) with a model whose last
        training stage saw no phase: neither ``--random-phase`` nor fastMRI ``.h5`` data (by their names) in
        its run record. ``None`` otherwise, and for bare model folders and models of images that are not
        complex (not 2 channels)."""
        from tasks.data.images import KSPACE_SUFFIXES

        if self.run is None or self.model.config.image_channels != 2:
            return None
        phased = self.run.get("identity", {}).get("training", {}).get("random_phase")
        data = (self.run.get("settings") or {}).get("data") or []
        if phased or any(str(path).lower().endswith(KSPACE_SUFFIXES) for path in data):
            return None
        return (
            f"{self.path} was trained on magnitude images only (its last training stage had no --random-phase "
            "and no .h5 data); on real k-space, whose images have a phase, it may do no better than the "
            "zero-filled image (README, *Phase for MRI*)"
        )

    @property
    def trained_on_family(self) -> bool:
        """Whether one model was trained for a family of operators (e.g. a range of ratios)."""
        return is_family_config(self.recorded_operator)


def load_trained(
    path: str | os.PathLike,
    expect_task: str | None = None,
    expect_operator: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    operator_defaults: dict[str, Any] | None = None,
) -> TrainedModel:
    """Load a trained IDM (model folder or training ``--out``) and check what it was trained for.

    Args:
        path: see :func:`resolve_model_dir`.
        expect_task: refuse a checkpoint trained for another task.
        expect_operator: operator settings the caller will use, e.g.
            ``{"name": "cs", "ratio": 0.1, "mode": "permuted"}``; each key is
            compared with the recorded operator config (``img_size`` and
            ``seed`` are ignored: test images have their own size and draw).
            A model trained on an operator family accepts every request inside it;
            settings the request leaves out are those of :attr:`TrainedModel.operator`
            (the member callers run by default).
        operator_defaults: the task's operator defaults, for
            :attr:`TrainedModel.operator` of family-trained models.

    Raises :class:`CheckpointError` with every mismatch named. A bare model
    folder without ``run.json`` carries no task metadata and is not checked.
    """
    folder = resolve_model_dir(path)
    run = read_run_record(folder)
    model = IDM.from_pretrained(folder, device=device)
    trained = TrainedModel(model, folder, run, operator_defaults)
    if run is not None:
        problems = []
        if expect_task is not None and trained.task != expect_task:
            problems.append(f"task: trained for {trained.task!r}, requested {expect_task!r}")
        foreign = trained.foreign_operator
        request = dict(expect_operator or {})
        if trained.trained_on_family and request:
            # the caller will run this model's default member with the requested settings on top: check that
            # operator (a box-mask component, which has no ratio, must not serve a random mask's ratio)
            request = {**(trained.operator or {}), **request}
        if foreign is None:
            problems += config_mismatches(trained.recorded_operator or {"name": "<not set>"}, request)
        elif expect_operator:
            problems.append(
                f"operator: trained with a physics of class {foreign}, which is not a registered toolkit operator (only its "
                "class was recorded), so it cannot be checked against or rebuilt from these settings; load the model "
                "in Python (idm.training.load_trained or IDM.from_pretrained) and give it that physics"
            )
        if problems:
            raise CheckpointError(
                f"checkpoint {str(folder)!r} does not match the request:\n  " + "\n  ".join(problems)
                + "\nuse a checkpoint trained for these settings (or change the options)"
            )
    return trained
