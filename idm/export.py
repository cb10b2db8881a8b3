"""Exporting trained models as small, self-describing folders to ship (``idm export``).

    from idm.export import export_model, export_prior
    export_model("runs/cs-any", "idm/weights/cs-any-ratio", half=True, prior_name="prior-natural-y")
    export_prior("runs/prior", "idm/weights/prior-natural-y")

An exported IDM is an ordinary model folder (``config.json``,
``model.safetensors``, ``run.json``: :func:`idm.train.load_trained` and the
shipped-model lookup read it) plus ``provenance.json``: the source
checkpoint, iteration, training seconds and hardware, the command, and the
weights' dtype. ``half`` stores the weights in float16 except the learnable
scalars (:data:`SCALAR_KEYS`: abar's ``alpha``, the wiring's ``v`` and
scales, whose rounding the steps amplify, for any number of steps) and other
tensors of at most :data:`KEEP_FP32_NUMEL` elements; loading casts back to
float32. An exported prior is the diffusers folder that ``idm pretrain``
wrote (loadable by diffusers; float16 unless ``half=False``) plus the same
``provenance.json``.

Every export is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from idm.checkpoint import CheckpointError, load_json, load_json_record, load_tensors, save_json, save_tensors
from idm.model import CONFIG_NAME, FORMAT as MODEL_FORMAT, WEIGHTS_NAME, check_config_matches_weights, weights_metadata
from idm.pretrain import PRIOR_DIR, RUN_FORMAT as PRETRAIN_RUN_FORMAT, exported_iteration, prior_fingerprint, prior_folder
from idm.training.averaging import average_weights, checkpoints_from
from idm.training.run_folder import RUN_NAME, RunFolder, replace_folder
from idm.training.state import TRAINER_STATE_NAME as STATE_NAME
from idm.training.trained import read_run_record, resolve_model_dir
from idm.unets.factory import is_prior_folder, unet_architecture

PROVENANCE_NAME = "provenance.json"
#: Tensors with at most this many elements stay float32 in a half-precision export.
KEEP_FP32_NUMEL = 16


def _provenance(source: Path, run: dict[str, Any], state: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    settings = run.get("settings", {})
    return {
        "source": str(source),
        "iteration": state.get("iteration"),
        "training_seconds": state.get("seconds"),
        "hardware": settings.get("hardware"),
        "arithmetic": settings.get("arithmetic"),  # fp32 or bf16 (runs from before it was recorded: None)
        "command": settings.get("command"),
        "data": settings.get("data"),
        **extra,
    }


def _recorded_path(folder: Path) -> str:
    """``folder`` as ``exported_from`` records it: relative to the working directory when it lies inside it (so a
    shipped model re-exported in the repository names no machine's paths), else absolute."""
    full = folder.resolve()
    try:
        return str(full.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(full)


def _names_folder(recorded: str, folder: Path) -> bool:
    """Whether an ``exported_from`` entry names ``folder``: an absolute path that resolves to it, or a relative one
    (recorded from the working directory of that export, which may not be this one) that its path ends with."""
    path, full = Path(recorded), folder.resolve()
    if path.is_absolute():
        return path.resolve() == full
    return (Path.cwd() / path).resolve() == full or full.parts[-len(path.parts):] == path.parts


#: Last key components of the learnable scalars (the schedule's ``alpha``, a wired chain's ``v`` and scales),
#: kept float32 in a half-precision export whatever their length (T of them for T steps).
SCALAR_KEYS = ("alpha", "v", "in_scale", "out_scale")


def _keeps_fp32(key: str, tensor: Any) -> bool:
    return tensor.numel() <= KEEP_FP32_NUMEL or key.rsplit(".", 1)[-1] in SCALAR_KEYS


def _half(tensors: dict[str, Any]) -> dict[str, Any]:
    """float16 copies of the floating tensors, except the learnable scalars and tensors of at most :data:`KEEP_FP32_NUMEL` elements."""
    return {k: v.half() if v.is_floating_point() and not _keeps_fp32(k, v) else v for k, v in tensors.items()}


def _full(tensors: dict[str, Any]) -> dict[str, Any]:
    """float32 copies of the floating tensors (a float16 export re-exported with ``half=False`` is float32 again)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _dtype_note(half: bool) -> str:
    return "float16 (learnable scalars and tensors of <= %d elements float32)" % KEEP_FP32_NUMEL if half else "float32"


def _export_kind(folder: Path) -> str:
    """``"prior"`` for an exported diffusion prior, else ``"model"``."""
    return "prior" if is_prior_folder(folder) else "model"


def _check_replaceable(out: Path, source: Path, kind: str) -> None:
    """``out`` may be written: new, empty, or an earlier export of the same ``kind`` (``"model"`` or
    ``"prior"``: ``provenance.json`` and ``config.json``, no training state beside them) that the atomic
    replacement may overwrite; never a folder holding ``source`` (a training run exported into itself would
    lose its checkpoints), an export of the other kind (the prior a model was trained from) or any other
    folder's files."""
    out, source = out.resolve(), source.resolve()
    if out != source and out in source.parents:
        raise CheckpointError(f"--out {out} holds the checkpoint being exported ({source}); export to another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder")
    is_export = (out / PROVENANCE_NAME).is_file() and (out / CONFIG_NAME).is_file() and not (out / "checkpoints").exists()
    if any(out.iterdir()) and not is_export:
        raise CheckpointError(
            f"--out {out} exists and is not an earlier export (no {PROVENANCE_NAME}, or a training run's "
            "checkpoints): export to a new folder, or remove it first"
        )
    if is_export and _export_kind(out) != kind:
        raise CheckpointError(f"--out {out} is an exported {_export_kind(out)}, which an exported {kind} would replace: "
                              "export to another folder")  # fmt: skip


def prior_name_warning(prior_name: str, checkpoint: str | os.PathLike, out: str | os.PathLike) -> str | None:
    """Why ``prior_name``, recorded as the prior of the model exported from ``checkpoint`` to ``out``, may not
    give the prior it was trained on (the path the checkpoint's config records), or ``None``.

    The model loads without its prior (its config holds the U-Net's architecture), but ``idm benchmark``'s
    DDNM and DPS baselines look the name up where :func:`idm.shipped.find_prior` does (``$IDM_MODELS_DIR``,
    then the shipped priors): a name that finds nothing stops them, one that finds another folder than the
    prior exported beside the model (a shipped prior of that name) is not that prior, and one that finds a
    prior of another architecture than the model's own is surely another prior. (A prior of the same
    architecture with other weights cannot be told apart from the model's.)
    """
    from idm.shipped import MODELS_ENV, find_prior

    trained_on = load_json(resolve_model_dir(checkpoint) / CONFIG_NAME, "IDM config")["idm"]["unet"]
    found = find_prior(prior_name)
    beside = Path(out).parent / prior_name
    if (beside / CONFIG_NAME).is_file() and (found is None or found.resolve() != beside.resolve()):
        now = f"finds {found}" if found is not None else "finds nothing"
        return f"the name {prior_name!r} {now}, not the prior {beside} beside the model: set {MODELS_ENV}={Path(out).parent}"
    if found is None:
        return (f"no prior named {prior_name!r} is in ${MODELS_ENV} or shipped, so idm benchmark's ddnm/dps cannot find "
                f"it: export the prior as DIR/{prior_name} (idm export --checkpoint PRETRAIN_RUN) and set {MODELS_ENV}=DIR")  # fmt: skip
    original = Path(trained_on)
    if original.is_dir() and unet_architecture(original) is not None and unet_architecture(found) != unet_architecture(original):
        return (f"the prior named {prior_name!r} is {found}, whose architecture differs from that of the prior this model "
                f"was trained on ({original}): idm benchmark's ddnm/dps would run that other prior; export the model's "
                "own prior under another name and give that name")  # fmt: skip
    return None


def export_model(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    half: bool = True,
    prior_name: str | None = None,
    hardware: str | None = None,
    final_projection: bool | None = None,
    average_from: int | None = None,
) -> Path:
    """Export an ``idm train`` checkpoint (or run folder: its latest checkpoint) to ``out``.

    Args:
        checkpoint: a training ``--out`` folder or one of its checkpoints (needs ``run.json``).
        out: the folder to write (replaced atomically if it exists).
        half: float16 weights (see the module docstring).
        prior_name: recorded as the model's ``unet`` instead of the local prior
            path (e.g. the name of a prior shipped beside it).
        hardware: what it was trained on, recorded in ``run.json`` and ``provenance.json`` (for runs
            that do not record it; it replaces what they record).
        final_projection: set ``IDMConfig.final_projection`` (it has no
            parameters: a deployment choice); ``None`` keeps the trained setting.
        average_from: export the uniform average of the weights of the run's checkpoints at this iteration
            or later (``checkpoint`` must then be a training ``--out`` folder; see
            :mod:`idm.training.averaging`); its records are those of the latest of them, and
            ``provenance.json`` lists the averaged iterations (``averaged_iterations``).

    ``checkpoint`` may also be an exported folder (a shipped model): its
    ``provenance.json`` is kept, and ``exported_from`` lists the exported
    folders it came through, oldest first, ending with that folder (each
    once: re-exporting a folder in place does not list it again; paths
    relative to the working directory when inside it, else absolute).
    """
    averaged = checkpoints_from(checkpoint, average_from) if average_from is not None else None
    folder = averaged[-1][1] if averaged else resolve_model_dir(checkpoint)
    _check_replaceable(Path(out), folder, "model")
    if not (folder / RUN_NAME).is_file():
        raise CheckpointError(f"{folder} has no {RUN_NAME}: export needs an `idm train` checkpoint (it records the task)")
    run = read_run_record(folder)  # an idm train run config whose identity maps task and operator, or an error
    state = load_json_record(folder / STATE_NAME, "trainer state")
    config = load_json_record(folder / CONFIG_NAME, "IDM config")
    if config.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{folder / CONFIG_NAME} is not an IDM model config")
    if not isinstance(config.get("idm"), dict) or not isinstance(config["idm"].get("unet"), str):
        raise CheckpointError(f"{folder / CONFIG_NAME} is damaged: its 'idm' settings must name the prior ('unet')")
    check_config_matches_weights(folder, config)  # before --prior-name or --final-projection change it
    tensors = average_weights([path for _, path in averaged]) if averaged else load_tensors(folder / WEIGHTS_NAME)
    tensors = _half(tensors) if half else _full(tensors)  # what provenance.json's weights_dtype says
    if prior_name is not None:
        config = {**config, "idm": {**config["idm"], "unet": prior_name}}
    extra = {"weights_dtype": _dtype_note(half), "prior": config["idm"]["unet"]}
    if averaged:
        extra["averaged_iterations"] = [iteration for iteration, _ in averaged]
    if hardware is not None:  # in both records: a re-export keeps its earlier provenance but for what changed
        run = {**run, "settings": {**run.get("settings", {}), "hardware": hardware}}
        extra["hardware"] = hardware
    if final_projection is not None:
        switch = {"final_projection": bool(final_projection)}
        config = {**config, "idm": {**config["idm"], **switch}}
        recorded = run.get("model_config", {})  # the training's record: only this field changes
        run = {**run, "model_config": {**recorded, "idm": {**recorded.get("idm", {}), **switch}}}
        extra.update(switch)
    if (folder / PROVENANCE_NAME).is_file():  # re-exporting a shipped model: its training record stays
        earlier = load_json_record(folder / PROVENANCE_NAME, "provenance")
        chain = earlier.get("exported_from") or []
        chain = [chain] if isinstance(chain, str) else list(chain)  # one folder in exports before the chain
        if not chain or not _names_folder(chain[-1], folder):  # a folder re-exported in place is listed once
            chain.append(_recorded_path(folder))
        provenance = {**earlier, **extra, "exported_from": chain}
    else:
        provenance = _provenance(folder, run, state, extra)

    def write(tmp: Path) -> None:
        save_tensors(tensors, tmp / WEIGHTS_NAME, metadata=weights_metadata(config))
        save_json(config, tmp / CONFIG_NAME)
        save_json(run, tmp / RUN_NAME)
        save_json(provenance, tmp / PROVENANCE_NAME)

    return replace_folder(Path(out), write)


def export_prior(
    run_folder: str | os.PathLike, out: str | os.PathLike, half: bool = True, hardware: str | None = None
) -> Path:
    """Export the prior of an ``idm pretrain`` run (its ``prior/`` folder, as last exported) to ``out``.

    ``half``: float16 weights as in :func:`export_model` (diffusers loads them
    into its float32 U-Net); otherwise the files are copied as they are.
    """
    run_folder = Path(run_folder)
    prior = run_folder / PRIOR_DIR
    if not (prior / "config.json").is_file():
        raise CheckpointError(f"{run_folder} is not an `idm pretrain` run folder with an exported {PRIOR_DIR}/ (a run "
                              f"that stopped before exporting one writes it when resumed: idm pretrain ... --resume)")  # fmt: skip
    _check_replaceable(Path(out), prior, "prior")
    # the checkpoint the prior was exported at: a run killed between a checkpoint and its export has a newer one
    exported = exported_iteration(prior)
    folder = RunFolder(run_folder, PRETRAIN_RUN_FORMAT)
    if exported is None:  # a prior folder that does not record its iteration: the run's latest checkpoint
        source = folder.latest()
    else:  # that checkpoint, if it was not pruned since
        source = next((path for iteration, path in folder.checkpoints() if iteration == exported), None)
    settings_from = source or folder.latest()  # a run's settings are the same in all its checkpoints
    run = load_json(settings_from / RUN_NAME, "run config") if settings_from is not None else {}
    state = load_json(source / STATE_NAME, "trainer state") if source is not None else {"iteration": exported}
    if hardware is not None:
        run = {**run, "settings": {**run.get("settings", {}), "hardware": hardware}}
    # the run's prior, which the models fine-tuned from it record (idm train's prior_sha256): this export is that
    # network, in half precision (exported_prior_fingerprint)
    extra = {"weights_dtype": _dtype_note(half), "exported_prior_sha256": prior_fingerprint(prior)}
    provenance = _provenance(source or prior, run, state, extra)

    def write(tmp: Path) -> None:
        for item in prior.iterdir():
            if not item.is_file():
                continue
            if half and item.name.endswith(".safetensors"):
                save_tensors(_half(load_tensors(item)), tmp / item.name, metadata={"format": "pt"})
            else:
                shutil.copy2(item, tmp / item.name)
        save_json(provenance, tmp / PROVENANCE_NAME)

    return replace_folder(Path(out), write)


def exported_prior_fingerprint(path: str | os.PathLike) -> str | None:
    """For an export of an ``idm pretrain`` run's prior (``path`` as ``--prior`` names it), the
    :func:`idm.pretrain.prior_fingerprint` of the prior it was exported from, which the models fine-tuned from
    that run record: the same network, in half precision here (``idm benchmark`` compares the record with
    what DDNM and DPS run). ``None`` for any other prior."""
    provenance = Path(prior_folder(path)) / PROVENANCE_NAME
    if not provenance.is_file():
        return None
    recorded = load_json(provenance, "export provenance")
    source = recorded.get("exported_prior_sha256") if isinstance(recorded, dict) else None
    return source if isinstance(source, str) else None


def weights_megabytes(folder: str | os.PathLike) -> float:
    """Size of the ``.safetensors`` files in ``folder`` in MiB."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20
