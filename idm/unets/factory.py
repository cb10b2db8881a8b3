"""Where noise-estimator U-Nets come from: the tiny test net, SD v1.5's architecture, or a folder.

All three give a diffusers model (``UNet2DModel`` or ``UNet2DConditionModel``);
:mod:`idm.unets.pruning` and :class:`idm.unets.wired_unet.WiredUNet` then adapt it.
Nothing is ever downloaded: a folder is read with ``local_files_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from idm.checkpoint import all_finite

#: The U-Net sources that are architectures built here, not folders: the test net and SD v1.5's (random weights).
BUILT_IN_UNETS = ("tiny", "sd15")

UNET_CLASSES: dict[str, type[nn.Module]] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
}

#: The U-Net of Stable Diffusion v1.5 (``unet/config.json`` of the release), architecture only.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}


def tiny_unet_config(image_channels: int) -> dict[str, Any]:
    """A ``UNet2DModel`` of 0.40M parameters (0.35M once IDM prunes its time embedding) with one attention scale, for tests."""
    return {
        "sample_size": 32,
        "in_channels": image_channels,
        "out_channels": image_channels,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [24, 48],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    }


#: File written beside a prior by ``idm pretrain``: ``{"format": "idm-prior", "data_range": [lo, hi], ...}``.
PRIOR_INFO_NAME = "idm_prior.json"


def read_prior_range(path: str | Path) -> tuple[float, float] | None:
    """The data range recorded in a U-Net folder's ``idm_prior.json``, or ``None`` if there is none; ``path``
    may also name a shipped prior, as for :func:`unet_source_folder`."""
    from idm.shipped import find_prior

    path = find_prior(str(path)) or Path(path)
    for folder in (path, path / "unet"):
        info_file = folder / PRIOR_INFO_NAME
        if info_file.is_file():
            try:
                low, high = json.loads(info_file.read_text())["data_range"]
                return float(low), float(high)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UNetSourceError(f"{info_file} is unreadable or has no valid data_range: {err}") from None
    return None


def is_prior_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a diffusion prior of ours: a diffusers ``config.json`` with the
    ``idm_prior.json`` that ``idm pretrain`` / ``idm export`` write beside it."""
    return (folder / PRIOR_INFO_NAME).is_file() and (folder / "config.json").is_file()


class UNetSourceError(ValueError):
    """A U-Net folder or config cannot be used."""


def unet_source_folder(path: Path) -> Path:
    """The folder holding the U-Net's ``config.json`` (``path`` or ``path/unet``); ``path`` may also name a
    shipped prior (or one in ``$IDM_MODELS_DIR``), as shipped models record theirs."""
    if not path.is_dir():
        from idm.shipped import find_prior

        found = find_prior(str(path))
        if found is None:
            raise UNetSourceError(f"U-Net source {str(path)!r} is neither 'tiny', 'sd15', an existing folder nor the name "
                                  "of a shipped prior (`idm info` lists them)")  # fmt: skip
        path = found
    for candidate in (path, path / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise UNetSourceError(
        f"{str(path)!r} is not a diffusers U-Net folder: no config.json in it or in its 'unet' subfolder"
    )


def check_prior_schedule(folder: Path) -> None:
    """A :class:`UNetSourceError` when the diffusers scheduler config beside a U-Net folder (``scheduler/`` of a
    pipeline folder, whose U-Net is ``folder`` or ``folder/unet``, or ``scheduler_config.json`` in ``folder``)
    describes another schedule than :data:`idm.step.DDPM_SCHEDULE`, which is what DDNM, DPS and IDM's
    ``schedule="ddpm"`` sample with; an unreadable one too. A folder without one is taken to be of that schedule."""
    from idm.step import DDPM_SCHEDULE

    pipeline = folder.parent if folder.name == "unet" else folder
    for candidate in (folder / "scheduler_config.json", pipeline / "scheduler" / "scheduler_config.json"):
        if not candidate.is_file():
            continue
        try:
            config = json.loads(candidate.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UNetSourceError(f"cannot read {candidate}: {err}") from None
        if not isinstance(config, dict):
            raise UNetSourceError(f"{candidate} is not a scheduler config (a JSON object)")
        wrong = []
        for key, want in DDPM_SCHEDULE.items():
            have = config.get(key, want)
            same = isinstance(have, (int, float)) and abs(float(have) - want) <= 1e-12 if isinstance(want, float) else have == want
            if not same:
                wrong.append(f"{key}={have!r} (need {want!r})")
        for key in ("trained_betas", "rescale_betas_zero_snr"):  # settings that replace or reshape the betas
            if config.get(key):
                wrong.append(f"{key}={config[key]!r:.60} (need none)")
        if wrong:
            raise UNetSourceError(f"{candidate} describes an unsupported schedule: {', '.join(wrong)}")


def check_unet_source(unet: str) -> None:
    """A :class:`UNetSourceError` unless ``unet`` is ``"tiny"``, ``"sd15"``, or names a folder whose
    ``config.json`` describes a supported diffusers U-Net (:func:`unet_source_folder`): the cheap check, before
    any output is written, of what building the model would refuse later (no weights are read)."""
    if unet not in BUILT_IN_UNETS:
        read_unet_class(unet_source_folder(Path(unet)))


def unet_architecture(path: str | Path) -> dict[str, Any] | None:
    """The architecture a U-Net source records (its ``config.json`` without diffusers' ``_``-prefixed bookkeeping:
    class name, version, origin), as :func:`unet_source_folder` finds it; ``None`` when there is none to read."""
    try:
        config = json.loads((unet_source_folder(Path(path)) / "config.json").read_text())
    except (OSError, ValueError):  # no U-Net there, or not JSON
        return None
    return {k: v for k, v in config.items() if not k.startswith("_")} if isinstance(config, dict) else None


def read_unet_class(folder: Path) -> str:
    """The diffusers class name recorded in ``folder/config.json``; clear errors otherwise."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UNetSourceError(f"cannot read {folder / 'config.json'}: {err}") from None
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    kind = cfg.get("format") if isinstance(cfg, dict) else None  # the toolkit's own folders say what they are
    if kind == "idm-pretrain-run":
        raise UNetSourceError(f"{folder} is an `idm pretrain` run folder; its prior (the U-Net) is {folder / 'prior'}")
    if kind in ("idm-model", "idm-train-run"):
        raise UNetSourceError(f"{folder} is an IDM model or training run, not a diffusion prior U-Net")
    if name not in UNET_CLASSES:
        raise UNetSourceError(
            f"{folder / 'config.json'} describes {name!r}, not one of the supported U-Nets "
            f"({', '.join(UNET_CLASSES)})"
        )
    return name


def _weights_variant(folder: Path) -> str | None:
    """``"fp16"`` for a folder whose only weights are the half-precision variant, else ``None``."""
    weights = [p.name for p in folder.glob("diffusion_pytorch_model*")]
    return "fp16" if weights and all(".fp16." in name for name in weights) else None


def unet_weight_files(folder: Path) -> list[Path]:
    """The weight files :func:`load_unet_folder` loads from the U-Net folder ``folder`` (diffusers' choice:
    safetensors before ``.bin``, the fp16 variant only where it is the only one; a sharded checkpoint's index
    and shards); other copies in the folder are not among them."""
    stem = "diffusion_pytorch_model" + (".fp16" if _weights_variant(folder) else "")
    for ext in (".safetensors", ".bin"):
        if (folder / f"{stem}{ext}").is_file():
            return [folder / f"{stem}{ext}"]
        index = folder / f"{stem}{ext}.index.json"
        if index.is_file():
            return [index, *sorted(folder.glob(f"diffusion_pytorch_model*-of-*{ext}"))]
    return []


def load_unet_folder(path: str | Path) -> nn.Module:
    """Load a diffusers U-Net with its weights from a local folder (offline).

    A folder that holds only a half-precision variant (``diffusion_pytorch_model.fp16.safetensors``, as
    local copies of Stable Diffusion often do) is loaded from it, in float32. A weights file that lacks
    some of the U-Net's tensors (diffusers would only log that it initialised them, here from uninitialised
    memory) or holds a NaN or infinite value is refused as damaged, naming the first such tensor.
    """
    folder = unet_source_folder(Path(path))
    cls = UNET_CLASSES[read_unet_class(folder)]
    variant = _weights_variant(folder)
    try:
        unet, info = cls.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False, variant=variant,
                                         output_loading_info=True)  # fmt: skip
    except (OSError, ValueError, RuntimeError, TypeError) as err:  # TypeError: a config.json value of a wrong type
        raise UNetSourceError(f"cannot load the U-Net weights in {folder}: {err}") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        raise UNetSourceError(f"the U-Net weights in {folder} lack {len(missing)} of the tensors its config.json "
                              f"describes (first: {missing[0]}): the weights file is damaged or of another U-Net")  # fmt: skip
    bad = next((name for name, t in unet.state_dict().items() if not all_finite(t)), None)
    if bad is not None:
        raise UNetSourceError(f"the U-Net weights in {folder} hold NaN or infinite values ({bad}): the weights file is damaged")
    return unet.float()


def unet_from_config(class_name: str, config: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """Build a randomly initialised diffusers U-Net from its class name and config."""
    if class_name not in UNET_CLASSES:
        raise UNetSourceError(f"unsupported U-Net class {class_name!r}; supported: {', '.join(UNET_CLASSES)}")
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        return UNET_CLASSES[class_name].from_config(clean)


def describe_unet(unet: nn.Module) -> tuple[str, dict[str, Any]]:
    """``(class name, JSON-able config)`` of a diffusers U-Net, enough to rebuild its architecture."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return type(unet).__name__, json.loads(json.dumps(config, default=list))


def materialize(module: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Give a module built on the meta device real storage and a fresh default initialisation."""
    module.to_empty(device=device)
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return module
