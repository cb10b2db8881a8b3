"""Pretraining a pixel-space diffusion prior (a diffusers ``UNet2DModel``) for IDM and the baselines.

    from idm.pretrain import PriorArchitecture, PretrainConfig, pretrain
    pretrain(PriorArchitecture(channels=1), dataset, "runs/prior", PretrainConfig(iters=20_000))
    # -> runs/prior/prior/ : IDMConfig(unet="runs/prior/prior"), UNet2DModel.from_pretrained(...),
    #                        DDPMScheduler.from_pretrained(...), DDPMPipeline(unet=..., scheduler=...)

Standard DDPM training: images in [0, 1] are mapped to [-1, 1] (diffusers'
convention, so ``DDPMPipeline`` outputs images directly), a timestep
``t ~ U{0..999}`` and noise ``e ~ N(0, I)`` per image, ``x_t`` from
diffusers' :class:`~diffusers.DDPMScheduler` (1000 steps, linear betas
1e-4..0.02, epsilon prediction), MSE between ``unet(x_t, t)`` and ``e``,
Adam, optional EMA of the weights (the exported prior holds the EMA weights).

The run folder is the same as ``idm train``'s (:mod:`idm.training.run_folder`):
``config.json``, ``log.csv`` and atomic checkpoints (``unet_config.json``,
``unet.safetensors``, ``ema.safetensors``, ``optimizer.safetensors``,
``rng.safetensors``, ``trainer_state.json``, ``run.json``); resumable exactly;
multi-process under torchrun. At every checkpoint the prior is (re)exported
atomically to ``OUT/prior/``: diffusers' ``config.json`` +
``diffusion_pytorch_model.safetensors``, ``scheduler_config.json`` and
``idm_prior.json`` (data range [-1, 1], channels, crop, iteration).

Noise and timesteps are drawn for the whole global batch from ``(seed,
iteration)`` and sliced per rank, so K processes compute what one process
with the same global batch computes.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from idm.checkpoint import CheckpointError, check_weights_fit, file_sha256, load_json, load_tensors, save_json, save_tensors
from idm.training import distributed, seeds
from idm.training.optimizer import fused_by_default
from idm.hardware import hardware_name
from idm.precision import autocast_for, training_precision
from idm.training.options import PRECISION_RESUME_HINT, LoopOptions, recorded_run_identity, warn_if_arithmetic_changed
from idm.training.batches import ShardedBatches, iteration_loader
from idm.training.distributed import DistEnv
from idm.training.ema import EMA
from idm.training.loop import Cadence, LoopResult, run_loop, checkpoint_time_guess
from idm.training.lr import set_learning_rate, step_lr
from idm.training.micro_batches import backward_in_micro_batches, micro_batch_slices
from idm.training.run_folder import RUN_NAME, RunFolder, replace_folder
from idm.training.state import read_checkpoint_files, restore_optimizer, restore_rng, resuming_from, write_trainer_state
from idm.unets.factory import PRIOR_INFO_NAME, unet_source_folder, unet_weight_files

RUN_FORMAT = "idm-pretrain-run"
PRIOR_DIR = "prior"
PRIOR_INFO = PRIOR_INFO_NAME  # read back by IDM (idm.unets.factory.read_prior_range)
RESUME_HINTS: dict[str, str] = {"precision": PRECISION_RESUME_HINT}
#: The noise schedule every prior is trained with (DDPM's, as diffusers' ``DDPMScheduler``).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "variance_type": "fixed_small",
}


def _width_multipliers(levels: int) -> list[int]:
    return ([1, 2, 4] + [4] * max(0, levels - 3))[:levels]


def _injectable_width_step(levels: int) -> int:
    """Widths are multiples of this: of 8, and such that each scale's channels (``width * multiplier`` at
    ``1 / 2**level`` of the image size) are a multiple of ``4**level``, which IDM's injectors need to
    pixel-shuffle the feature map to the image size."""
    step = 8
    for level, mult in enumerate(_width_multipliers(levels)):
        factor = 4**level // math.gcd(mult, 4**level)
        step = step * factor // math.gcd(step, factor)
    return step


@dataclass(frozen=True)
class PriorArchitecture:
    """A ``UNet2DModel`` sized for short budgets.

    ``levels`` scales of ``width * (1, 2, 4, 4, ...)`` channels with
    ``layers_per_block`` resnets each, attention at the lowest scale (and in
    the mid block) when ``attention``. The default (64/128/256, 2 layers) has
    about 15.7M parameters. ``sample_size`` is only recorded (diffusers'
    pipelines use it as the output size).
    """

    channels: int = 1
    width: int = 64
    levels: int = 3
    layers_per_block: int = 2
    attention: bool = True
    sample_size: int = 64

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"PriorArchitecture: {message}")

        need(self.channels >= 1, f"channels must be >= 1, got {self.channels}")
        need(self.width >= 8 and self.width % 8 == 0, f"width must be a multiple of 8, got {self.width}")
        need(1 <= self.levels <= 6, f"levels must be in 1..6, got {self.levels}")
        need(self.layers_per_block >= 1, f"layers_per_block must be >= 1, got {self.layers_per_block}")
        step = _injectable_width_step(self.levels)
        need(self.width % step == 0,
             f"with {self.levels} levels the width must be a multiple of {step}, got {self.width}: IDM's measurement "
             f"injectors pixel-shuffle the {self.block_channels()[-1]}-channel maps at 1/{self.downsampling} of the image "
             f"size to it, which needs a multiple of {self.downsampling ** 2} channels")  # fmt: skip

    def block_channels(self) -> list[int]:
        """Channels of each scale, finest first: ``width * (1, 2, 4, 4, ...)``."""
        return [self.width * m for m in _width_multipliers(self.levels)]

    @property
    def downsampling(self) -> int:
        """Image sizes must be multiples of this (2 ** (levels - 1))."""
        return 2 ** (self.levels - 1)

    def unet_config(self) -> dict[str, Any]:
        channels = self.block_channels()
        low = "AttnDownBlock2D" if self.attention else "DownBlock2D"
        up_low = "AttnUpBlock2D" if self.attention else "UpBlock2D"
        return {
            "sample_size": self.sample_size,
            "in_channels": self.channels,
            "out_channels": self.channels,
            "block_out_channels": channels,
            "layers_per_block": self.layers_per_block,
            "down_block_types": ["DownBlock2D"] * (self.levels - 1) + [low],
            "up_block_types": [up_low] + ["UpBlock2D"] * (self.levels - 1),
            "norm_num_groups": 32 if self.width % 32 == 0 else 8,
            "attention_head_dim": min(32, self.width),
            "add_attention": self.attention,
        }


@dataclass(frozen=True)
class PretrainConfig(LoopOptions):
    """Training options of ``idm pretrain`` (the shared ones: :class:`~idm.training.options.LoopOptions`).

    ``ema_decay``: EMA of the weights with warm-up ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates; 0 disables it (the prior then holds the raw weights).
    ``lr_milestones``: iterations after which the learning rate is multiplied
    by ``lr_gamma`` (default: none, a constant rate).
    """

    batch_size: int = 16
    lr: float = 2e-4
    log_every: int = 50
    lr_milestones: tuple[int, ...] = ()
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        super().__post_init__()
        self.need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        Cadence(self.checkpoint_every, self.log_every, 0)

    def lr_at(self, index: int) -> float:
        return step_lr(self.lr, self.lr_gamma, self.lr_milestones, index)

    def identity(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "lr_milestones": sorted(int(m) for m in self.lr_milestones),
            "lr_gamma": self.lr_gamma,
            "ema_decay": self.ema_decay,
            "seed": self.seed,
            "precision": self.precision,
            "augment": self.augment,
            "scheduler": SCHEDULER_CONFIG,
        }

    def settings(self) -> dict[str, Any]:
        keys = set(self.identity())
        return {k: v for k, v in asdict(self).items() if k not in keys}


def build_unet(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel.from_config(config)


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def export_prior(unet: nn.Module, weights: dict[str, Tensor], folder: Path, info: dict[str, Any]) -> Path:
    """Write ``weights`` in ``unet``'s architecture as a diffusers folder (+ scheduler, + ``idm_prior.json``), atomically."""
    copy_ = type(unet).from_config(unet.config)  # a fresh CPU copy of the architecture
    copy_.load_state_dict({k: v.detach().to("cpu") for k, v in weights.items()})

    def write(tmp: Path) -> None:
        copy_.save_pretrained(tmp, safe_serialization=True)
        make_scheduler().save_pretrained(tmp)
        save_json({"format": "idm-prior", "data_range": [-1.0, 1.0], **info}, tmp / PRIOR_INFO)

    return replace_folder(folder, write)


def prior_fingerprint(path: str | Path) -> str:
    """A SHA-256 over the U-Net files of the prior ``path`` names (as :func:`prior_folder` resolves it: a folder,
    its ``unet/``, an ``idm pretrain`` run's ``prior/``, a shipped prior's name): its ``config.json`` and the
    weights that loading it reads (:func:`idm.unets.unet_weight_files`; not other copies beside them). Equal
    fingerprints are the same network, wherever its folder lies. ``ValueError`` when there is no prior."""
    folder = unet_source_folder(Path(prior_folder(path)))
    files = [folder / "config.json", *unet_weight_files(folder)]
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def is_pretrain_run(folder: Path) -> bool:
    """Whether ``folder`` is an ``idm pretrain`` ``--out`` folder: its ``config.json`` says so, or it has none
    (a run folder without its config) but holds an exported ``prior/``."""
    if not (folder / "config.json").is_file():
        return (folder / PRIOR_DIR / "config.json").is_file()
    try:
        return load_json(folder / "config.json", "run config").get("format") == RUN_FORMAT
    except (CheckpointError, AttributeError):
        return False


def prior_folder(path: str | Path) -> str:
    """What a ``--prior`` argument names, as an absolute path: an ``idm pretrain`` ``--out`` folder stands for the
    prior it exports (``OUT/prior``), a shipped prior's name (``prior-natural-y``) for its folder when no such
    path exists, any other folder for itself. A pretrain run that has not exported a prior yet is a :class:`CheckpointError`."""
    from idm.shipped import find_prior

    folder = Path(path)
    if not folder.exists():
        found = find_prior(str(path))  # a name: a shipped model's is checked below as a folder given by path is
        if found is None:
            return str(folder)
        folder = found
    folder = Path(os.path.abspath(folder))  # recorded with the models trained on it: valid from any working folder
    if is_pretrain_run(folder):
        if not (folder / PRIOR_DIR / "config.json").is_file():
            raise CheckpointError(f"{folder} is an `idm pretrain` run that has not exported its {PRIOR_DIR}/ yet "
                                  "(it does at its first checkpoint, and when resumed)")  # fmt: skip
        return str(folder / PRIOR_DIR)
    from idm.training.trained import is_model_dir

    if is_model_dir(folder) or (folder / "checkpoints").is_dir():
        raise CheckpointError(
            f"{folder} is an IDM model or an `idm train` run, not a diffusion prior: --prior takes a diffusers U-Net "
            "folder, an `idm pretrain` run or a shipped prior's name; to start from a trained IDM, use --init-from "
            "(idm train), or --checkpoint (idm benchmark, whose DDNM and DPS then use that model's prior)"
        )
    return str(folder)


def exported_iteration(prior: Path) -> int | None:
    """The iteration of the prior exported in ``prior`` (its ``idm_prior.json``), ``None`` if none is readable."""
    try:
        return int(load_json(prior / PRIOR_INFO, "prior info").get("iteration"))
    except (CheckpointError, AttributeError, TypeError, ValueError):
        return None


def _read_unet_files(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor] | None]:
    unet_config = load_json(folder / "unet_config.json", "U-Net config")
    weights = load_tensors(folder / "unet.safetensors")
    ema = load_tensors(folder / "ema.safetensors") if (folder / "ema.safetensors").exists() else None
    return unet_config, weights, ema


def _read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor] | None, dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    (unet_config, weights, ema), state, opt_tensors, rng_tensors = read_checkpoint_files(folder, _read_unet_files)
    return unet_config, weights, ema, state, opt_tensors, rng_tensors


def pretrain(
    arch: PriorArchitecture,
    dataset: Dataset,
    out: str | os.PathLike,
    config: PretrainConfig,
    *,
    data_info: dict[str, Any] | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    started_at: float | None = None,
    env: DistEnv | None = None,
    settings: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> tuple[LoopResult, Path]:
    """Train a diffusion prior; returns ``(loop result, exported prior folder)``.

    Args:
        arch: the U-Net (its ``channels`` must match the dataset's items).
        dataset: items float ``(C, H, W)`` in [0, 1], all the same size (crops),
            ``H`` and ``W`` multiples of ``arch.downsampling``.
        out, config, resume, device, started_at, env, settings, say: as :func:`idm.train.train`.
        data_info: JSON-able facts about the data (color mode, crop) recorded
            with the run and in ``idm_prior.json``.
    """
    started_at = time.monotonic() if started_at is None else started_at
    env = env or distributed.detect()
    device = torch.device(device)
    if config.batch_size % env.world_size:
        raise ValueError(
            f"--batch-size {config.batch_size} is the global batch and must be a multiple of the "
            f"{env.world_size} processes"
        )
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    first = torch.as_tensor(dataset[0])
    if first.dim() != 3 or first.shape[0] != arch.channels:
        raise ValueError(f"training items have shape {tuple(first.shape)}, expected ({arch.channels}, H, W)")
    if first.shape[-1] % arch.downsampling or first.shape[-2] % arch.downsampling:
        raise ValueError(
            f"image size {first.shape[-2]}x{first.shape[-1]} must be a multiple of {arch.downsampling} "
            f"for a {arch.levels}-level U-Net (change --crop or --levels)"
        )
    unet_config = arch.unet_config()
    identity = {
        "architecture": unet_config,
        "data_info": data_info or {},
        "training": config.identity(),
        "data": {"items": len(dataset), "shape": list(first.shape)},
    }
    folder = RunFolder(out, RUN_FORMAT, outputs=(PRIOR_DIR,))
    ckpt = folder.prepare(identity, resume, hints=RESUME_HINTS, recorded_identity=recorded_run_identity, lock=env.is_main)

    try:  # from here on, leave the process group and give back the run folder's lock whatever happens
        device = distributed.setup(env, device)
        precision = training_precision(config.precision, device)
        if ckpt is not None and env.is_main:
            warn_if_arithmetic_changed(folder.read_config(ckpt / RUN_NAME), precision)
        torch.manual_seed(config.seed)
        unet = build_unet(unet_config)
        start, seconds_before = 0, 0.0
        if ckpt is not None:
            saved_config, weights, ema_weights, state, opt_tensors, rng_tensors = _read_checkpoint(ckpt)
            with resuming_from(ckpt):
                check_weights_fit(unet.state_dict(), weights, ckpt / "unet.safetensors", "the U-Net")
                if ema_weights is not None:
                    averaged = {k: v for k, v in unet.state_dict().items() if v.is_floating_point()}  # what EMA keeps
                    check_weights_fit(averaged, ema_weights, ckpt / "ema.safetensors", "the U-Net's EMA")
            unet.load_state_dict(weights)
            start, seconds_before = state["iteration"], float(state.get("seconds", 0.0))
        unet.to(device).train()
        optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr, fused=fused_by_default(unet.parameters()))
        ema = EMA(unet, config.ema_decay) if config.ema_decay > 0 else None
        if ckpt is not None:
            with resuming_from(ckpt):
                restore_optimizer(optimizer, opt_tensors, state["optimizer"])
                restore_rng(rng_tensors, state.get("rng", {}))
            if ema is not None:
                if ema_weights is None:
                    raise CheckpointError(f"{ckpt} has no ema.safetensors but the run uses an EMA")
                ema.shadow = {k: v.to(device).float() for k, v in ema_weights.items()}
                ema.updates = int(state.get("ema_updates", start))

        run_config = {
            "identity": identity,
            "settings": {**config.settings(), "hardware": hardware_name(device), **(settings or {}),
                         "world_size": env.world_size, "device": device.type,
                         "arithmetic": precision},
        }
        log = folder.begin(run_config, ckpt, start, config.iters, say) if env.is_main else None
        net = distributed.wrap_ddp(unet, env, device)
        scheduler = make_scheduler()
        shards = ShardedBatches(dataset, config.batch_size, config.seed, env.rank, env.world_size, config.augment)
        loader = iteration_loader(shards, start, config.iters, config.num_workers, pin_memory=device.type == "cuda")
        prior_info = {"channels": arch.channels, **(data_info or {})}

        def step(index: int, batch: Tensor) -> Tensor:
            x = batch.to(device, non_blocking=True) * 2 - 1
            shape = (config.batch_size, *x.shape[1:])
            noise = torch.randn(shape, generator=seeds.generator(config.seed, seeds.NOISE, index))
            t = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (config.batch_size,),
                              generator=seeds.generator(config.seed, seeds.TIMESTEPS, index))
            noise, t = (seeds.rows_of_rank(d, env.rank, env.world_size).to(device) for d in (noise, t))
            noisy = scheduler.add_noise(x, noise, t)
            set_learning_rate(optimizer, config.lr_at(index))
            pieces = micro_batch_slices(x.shape[0], config.micro_batch)
            runner = net if len(pieces) == 1 else unet  # several pieces: gradients averaged once, after the last

            def loss_of(rows: slice) -> Tensor:
                with autocast_for(device.type, precision):
                    pred = runner(noisy[rows], t[rows], return_dict=False)[0]
                return F.mse_loss(pred.float(), noise[rows])

            optimizer.zero_grad(set_to_none=True)
            loss = backward_in_micro_batches(loss_of, x.shape[0], config.micro_batch)
            if len(pieces) > 1:
                distributed.average_gradients(unet, env)
            optimizer.step()
            if ema is not None:
                ema.update(unet)
            return loss

        def save(iteration: int, seconds: float) -> None:
            def write(tmp: Path) -> None:
                save_json(unet_config, tmp / "unet_config.json")
                save_tensors(unet.state_dict(), tmp / "unet.safetensors")
                if ema is not None:
                    save_tensors(ema.shadow, tmp / "ema.safetensors")
                ema_updates = ema.updates if ema is not None else 0
                write_trainer_state(tmp, optimizer, iteration, seconds, env.world_size, ema_updates=ema_updates)

            folder.save_checkpoint(iteration, write, {**run_config, "iteration": iteration}, config.keep)
            export_current(iteration)

        def export_current(iteration: int) -> None:
            weights = ema.weights_for(unet) if ema is not None else unet.state_dict()
            export_prior(unet, weights, folder.out / PRIOR_DIR, {**prior_info, "iteration": iteration, "ema_decay": config.ema_decay})

        if ckpt is not None and env.is_main and exported_iteration(folder.out / PRIOR_DIR) != start:
            export_current(start)  # a run stopped between its checkpoint and the prior's export: catch up

        deadline = None if config.max_minutes is None else started_at + 60.0 * config.max_minutes
        result = run_loop(
            start=start,
            stop=config.iters,
            batches=loader,
            step=step,
            lr_at=config.lr_at,
            save=save,
            cadence=Cadence(config.checkpoint_every, config.log_every, 0),
            env=env,
            device=device,
            log=log,
            deadline=deadline,
            seconds_before=seconds_before,
            progress=config.progress,
            save_estimate=checkpoint_time_guess(unet),
            desc="idm pretrain",
            bf16=precision == "bf16",  # no checkpoints=: idm pretrain has no --init-from to start a new run from one
        )
    except BaseException as err:
        named = distributed.end(env, folder.unlock, err)
        if named is not err:
            raise named from err
        raise
    distributed.end(env, folder.unlock)
    return result, folder.out / PRIOR_DIR
