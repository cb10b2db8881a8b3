"""End-to-end fine-tuning of an IDM (paper Secs. 3.2 and 4.1), resumable and multi-GPU.

    from idm.train import TrainConfig, train
    result = train(IDMConfig(unet="runs/prior/prior"), dataset, operator, "runs/cs10",
                   TrainConfig(iters=50_000, batch_size=8), task="cs")

Per iteration ``i`` (0-based): this process's shard of the global batch
``x`` (``(B/K, C, H, W)`` in [0, 1], one of the 8 flips/rotations per global
batch, :mod:`idm.training.batches`; with several image sizes, those of
iteration ``i``'s size, ``i % K``, and its operator), a fresh operator draw
``op.resample(seed(run seed, i))`` when the operator is random (permuted CS,
inpainting masks, MRI masks; identical on every rank without
communication), ``y = op.A(x)`` in float32, ``x_hat = model(y, op)`` under
bf16 autocast on CUDA (float32 on the CPU unless ``precision="bf16"``), L1 loss ``mean|x_hat - x|``
(plus ``ssim_weight * (1 - SSIM)`` when asked; with ``log_loss``, the mean
over images of the log of each image's loss: :mod:`idm.training.losses`),
Adam; the learning rate is ``lr * gamma ** (number of milestones <= i)``
and the learnable scalars (``abar``'s ``alpha``, the wiring ``v`` and
in/out scales) use ``lr * scalar_lr_mult``.

Exact resume: every random draw is derived from ``(seed, iteration)``
(:mod:`idm.training.seeds`) and a checkpoint holds the weights, the whole
Adam state and the RNG states, so a run of 20 iterations and a run of 10
resumed for 10 more give bit-identical weights on the CPU.

Checkpoint folder (``OUT/checkpoints/iter_NNNNNNN/``): ``config.json`` +
``model.safetensors`` (exactly :meth:`IDM.save_pretrained`, so the folder is
an IDM model folder), ``optimizer.safetensors``, ``rng.safetensors``,
``trainer_state.json`` and ``run.json`` (task, operator config, model
config, training identity). With ``ema_decay`` (an exponential moving
average of the weights, :class:`~idm.training.ema.EMA`), ``model.safetensors``
holds the averaged weights, which every reader of the folder uses
(``idm reconstruct``, ``idm benchmark``, ``idm export``, validation), and
``training_weights.safetensors`` the weights the optimizer moves, from
which ``--resume`` continues. :func:`resolve_model_dir` and
:func:`load_trained` turn a training ``--out`` folder into a model for
``idm reconstruct`` / ``idm benchmark`` and refuse mismatched tasks/operators.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from idm.channel_layout import convert_channel_layout
from idm.checkpoint import CheckpointError, load_tensors, save_tensors
from idm.config import IDMConfig
from idm.model import IDM, refuse_nonlinear_pinv
from idm.hardware import hardware_name
from idm.precision import autocast_for, training_precision
from idm.pretrain import prior_fingerprint
from idm.step import LearnedSchedule
from idm.training import distributed, seeds
from idm.training.optimizer import fused_by_default
from idm.training.image_noise import check_noise_level
from idm.training.phase import check_phase_fraction
from idm.training.options import PRECISION_RESUME_HINT, LoopOptions, recorded_run_identity, warn_if_arithmetic_changed
from idm.training.batches import ShardedBatches, iteration_loader
from idm.training.distributed import DistEnv
from idm.training.ema import EMA
from idm.training.loop import Cadence, LoopResult, run_loop, checkpoint_time_guess
from idm.training.losses import ReconstructionLoss, check_ssim_weight
from idm.training.lr import milestones_from_fractions, set_learning_rate, step_lr
from idm.training.micro_batches import backward_in_micro_batches, micro_batch_slices
from idm.training.run_folder import RUN_NAME, RunFolder
from idm.training.trained import RUN_FORMAT, TrainedModel, load_trained, read_run_record, resolve_model_dir
from idm.training.state import read_checkpoint_files, restore_optimizer, restore_rng, resuming_from, write_trainer_state
from idm.unets import BUILT_IN_UNETS, unet_architecture
from idm.wiring import WiredSequence
from operators.conformance import check_plugin_operator

__all__ = [
    "RUN_FORMAT", "TrainConfig", "TrainResult", "TrainedModel", "load_trained", "make_optimizer", "resolve_model_dir",
    "scalar_parameter_names", "train",
]  # fmt: skip

#: Learning-rate milestones as fractions of ``iters`` (the paper: 10k/20k/30k/40k of 50k).
DEFAULT_MILESTONE_FRACTIONS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
RESUME_HINTS = {
    "lr_milestones": "(the default milestones follow --iters: to train longer, resume with the run's "
    "milestones given explicitly as --lr-milestones)",
    "ssim_weight": "(null: the L1 loss alone; to change the loss, start a new run from this one's checkpoint with --init-from)",
    "log_loss": "(null: the plain mean loss; to change the loss, start a new run from this one's checkpoint with --init-from)",
    "ema_decay": "(null: no average of the weights; to change it, start a new run from this one's checkpoint with --init-from)",
    "random_phase": "(null: images as read; to change it, start a new run from this one's checkpoint with --init-from)",
    "image_noise": "(null: images as read; to change it, start a new run from this one's checkpoint with --init-from)",
    "precision": PRECISION_RESUME_HINT,
}


@dataclass(frozen=True)
class TrainConfig(LoopOptions):
    """Training options of ``idm train`` (the shared ones: :class:`~idm.training.options.LoopOptions`).

    Identity (must match on ``--resume``): ``batch_size`` (global, over all
    processes), ``lr``, ``lr_milestones`` (resolved), ``lr_gamma``,
    ``scalar_lr_mult``, ``seed``, ``precision``, ``augment``, ``randomize_operator``,
    ``ssim_weight`` (recorded only when non-zero, so that runs from before it
    joined the identity, which trained without the SSIM term or recorded its
    weight in their settings, still resume: :func:`_recorded_identity`),
    ``log_loss``, ``ema_decay``, ``random_phase`` and ``image_noise`` (recorded only when on, for the same reason).
    Settings (may change between chunks): the rest.

    Attributes:
        lr_milestones: iterations after which the learning rate is multiplied
            by ``lr_gamma``; ``None``: 20/40/60/80 % of ``iters``.
        scalar_lr_mult: learning-rate factor of the learnable scalars
            (``alpha`` of ``abar``, wiring ``v``, in/out scales). 1 = the
            paper's single learning rate; larger values let ``abar`` move
            (it barely moves at 1e-4-2e-4, see the calibration notes).
        randomize_operator: a fresh operator draw every iteration (for operators
            with random parts; others are unaffected).
        val_every: iterations between validations (``0``: at checkpoints).
        ssim_weight: weight of the ``1 - SSIM`` term added to the L1 loss
            (:class:`~idm.training.losses.ReconstructionLoss`; SSIM on the
            ``metric_transform`` images). ``0`` (default): the paper's L1 alone.
        log_loss: minimise the mean over images of the log of each image's
            loss instead of the plain mean (``log_form`` of
            :class:`~idm.training.losses.ReconstructionLoss`): easy and hard
            images (and operators, e.g. CS ratios) weigh alike, as in mean
            PSNR. The logged loss is then that mean log (negative).
        ema_decay: keep an exponential moving average of the weights
            (:class:`~idm.training.ema.EMA`, e.g. 0.99 or 0.999) and checkpoint
            it as the model; ``0`` (default): the last weights, as the paper.
        random_phase: the fraction of complex (2-channel) training images, in
            ``[0, 1]``, multiplied by a random smooth phase
            (:mod:`idm.training.phase`), so that a model trained on magnitude
            images also serves real k-space, whose images have phase; ``0``
            (default): none.
        image_noise: the largest standard deviation of the Gaussian noise
            added to each training image, target included (its own, uniform
            in ``[0, image_noise]``; :mod:`idm.training.image_noise`), so that
            a model trained on clean images also serves noisy scanner data;
            ``0`` (default): none.
    """

    iters: int = 50_000
    lr_milestones: tuple[int, ...] | None = None
    scalar_lr_mult: float = 1.0
    randomize_operator: bool = True
    val_every: int = 0
    ssim_weight: float = 0.0
    log_loss: bool = False
    ema_decay: float = 0.0
    random_phase: float = 0.0
    image_noise: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        try:
            check_ssim_weight(self.ssim_weight)
        except ValueError as error:
            self.need(False, str(error))
        try:
            object.__setattr__(self, "random_phase", check_phase_fraction(self.random_phase))
            object.__setattr__(self, "image_noise", check_noise_level(self.image_noise))
        except ValueError as error:
            self.need(False, str(error))
        self.need(self.scalar_lr_mult > 0, f"scalar_lr_mult must be positive, got {self.scalar_lr_mult}")
        if self.lr_milestones is not None:
            self.need(all(int(m) >= 1 for m in self.lr_milestones), f"lr_milestones must be positive, got {self.lr_milestones}")
        Cadence(self.checkpoint_every, self.log_every, self.val_every)

    def milestones(self) -> tuple[int, ...]:
        """The learning-rate milestones (explicit, or the default fractions of ``iters``)."""
        if self.lr_milestones is not None:
            return tuple(sorted(int(m) for m in self.lr_milestones))
        return milestones_from_fractions(self.iters, DEFAULT_MILESTONE_FRACTIONS)

    def lr_at(self, index: int) -> float:
        """Base learning rate of step ``index`` (0-based)."""
        return step_lr(self.lr, self.lr_gamma, self.milestones(), index)

    def identity(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "lr_milestones": list(self.milestones()),
            "lr_gamma": self.lr_gamma,
            "scalar_lr_mult": self.scalar_lr_mult,
            "seed": self.seed,
            "precision": self.precision,
            "augment": self.augment,
            "randomize_operator": self.randomize_operator,
            **({"ssim_weight": self.ssim_weight} if self.ssim_weight else {}),
            **({"log_loss": True} if self.log_loss else {}),
            **({"ema_decay": self.ema_decay} if self.ema_decay else {}),
            **({"random_phase": self.random_phase} if self.random_phase else {}),
            **({"image_noise": self.image_noise} if self.image_noise else {}),
        }

    def settings(self) -> dict[str, Any]:
        keys = (set(self.identity()) | {"lr_milestones"}) - {"ssim_weight", "log_loss", "ema_decay", "random_phase", "image_noise"}  # shown when off too
        return {k: v for k, v in asdict(self).items() if k not in keys}


@dataclass(frozen=True)
class TrainResult:
    """How a ``train`` call ended: see :class:`idm.training.loop.LoopResult`; plus where things are."""

    loop: LoopResult
    out: Path
    checkpoint: Path | None
    resumed_from: int = 0

    @property
    def iteration(self) -> int:
        return self.loop.iteration

    @property
    def finished(self) -> bool:
        return self.loop.finished


# ---------------------------------------------------------------------------------------------
# parameters and optimizer
# ---------------------------------------------------------------------------------------------
def scalar_parameter_names(model: nn.Module) -> set[str]:
    """Names of the learnable scalars: parameters owned by a ``WiredSequence`` or ``LearnedSchedule``."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (WiredSequence, LearnedSchedule)):
            for pname, _ in module.named_parameters(recurse=False):
                names.add(f"{prefix}.{pname}" if prefix else pname)
    return names


def make_optimizer(model: nn.Module, lr: float, scalar_lr_mult: float, fused: bool | None = None) -> torch.optim.Adam:
    """Adam with two groups: the network weights (``lr``) and the scalars (``lr * scalar_lr_mult``).

    Each group carries its factor as ``"lr_mult"`` (saved with the optimizer state).
    ``fused`` (default: when every parameter is on a GPU) uses torch's fused
    kernel (:mod:`idm.training.optimizer`).
    """
    scalars = scalar_parameter_names(model)
    weights = [p for n, p in model.named_parameters() if p.requires_grad and n not in scalars]
    scalar_params = [p for n, p in model.named_parameters() if p.requires_grad and n in scalars]
    groups = [{"params": weights, "lr": lr, "lr_mult": 1.0}]
    if scalar_params:
        groups.append({"params": scalar_params, "lr": lr * scalar_lr_mult, "lr_mult": float(scalar_lr_mult)})
    return torch.optim.Adam(groups, lr=lr, fused=fused_by_default(model.parameters()) if fused is None else fused)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
#: IDMConfig fields newer than some recorded runs, which left them out (as runs of a later version did while they
#: were at their defaults: no final projection, DDNM's CG count, the U-Net tiled over the channels); a recorded
#: identity without one reads as its default (:func:`_recorded_identity`).
_FIELDS_ADDED_LATER = ("final_projection", "projection_cg_iters", "separate_channels")


def _recorded_identity(run: dict[str, Any]) -> dict[str, Any]:
    """A saved run's identity, as this version records it: runs from before ``ssim_weight`` joined it recorded
    the weight in their settings, runs from before ``precision`` recorded ``amp``
    (:func:`~idm.training.options.recorded_run_identity`), and runs from before a model field of :data:`_FIELDS_ADDED_LATER` existed
    (or that left it out at its default) had that field's default."""
    identity = recorded_run_identity(run)
    training = identity.get("training") if isinstance(identity, dict) else None
    weight = run.get("settings", {}).get("ssim_weight") if isinstance(run.get("settings"), dict) else None
    if isinstance(training, dict) and "ssim_weight" not in training and weight:
        identity = {**identity, "training": {**training, "ssim_weight": weight}}
    model = identity.get("model") if isinstance(identity, dict) else None
    if isinstance(model, dict):
        defaults = {name: getattr(IDMConfig, name) for name in _FIELDS_ADDED_LATER}
        identity = {**identity, "model": {**defaults, **model}}
    return identity


def _model_identity(config: IDMConfig) -> dict[str, Any]:
    d = config.to_dict()
    if d["unet"] not in BUILT_IN_UNETS:
        d["unet"] = "<folder>"  # the folder's weights are only read at the start; it may move between chunks
    del d["keep_attention"]  # how the backward runs, not what it computes: may change between chunks
    return d


def _prior_fingerprint(unet: str, resumed: Path | None) -> str | None:
    """The :func:`idm.pretrain.prior_fingerprint` of the prior a run fine-tunes from, recorded with it so that
    ``idm benchmark`` can tell whether DDNM and DPS run that same network: a resumed run's recorded one
    (``None`` for a run recorded before there was one: the prior folder given to a later chunk is not what it
    was trained from, necessarily), else the folder's (``None`` without one)."""
    if resumed is not None:
        return (read_run_record(resumed) or {}).get("settings", {}).get("prior_sha256")
    if unet in BUILT_IN_UNETS:
        return None
    try:
        return prior_fingerprint(unet)
    except (OSError, ValueError):  # the recorded prior of a warm start that is not here
        return None


def _check_resumed_prior(unet: str, model: IDM, checkpoint: Path) -> None:
    """A :class:`CheckpointError` when the prior folder given to a resumed run (``unet``; its weights are not
    read again, so it may move between chunks) holds another U-Net architecture than the run's model: the
    run's record would then name a prior it was not trained from."""
    given = None if unet in BUILT_IN_UNETS else unet_architecture(unet)
    if given is None:  # no U-Net there (moved away): nothing to compare; its weights are not needed
        return
    recorded = model.export_config().get("unet_config", {})
    differ = sorted(k for k in set(given) & set(recorded) if given[k] != recorded[k])
    if differ:
        shown = ", ".join(f"{k} {given[k]} (the run's: {recorded[k]})" for k in differ[:3])
        raise CheckpointError(f"--resume: the prior {unet!r} is another U-Net than the one the run in {checkpoint.parent.parent} "
                              f"was trained from ({shown}); pass the run's prior, or start a new run")  # fmt: skip


def _fresh_model(model_config: IDMConfig, init_model: IDM | None) -> IDM:
    """``IDM(model_config)``: from its prior folder, or with ``init_model``'s U-Net architecture and weights
    (converted when ``model_config`` runs the colour channels the other way: :mod:`idm.channel_layout`)."""
    if init_model is None:
        return IDM(model_config)
    model = IDM.from_config_dict({**init_model.export_config(), "idm": model_config.to_dict()}, init_weights=False)
    weights = init_model.state_dict()
    if model_config.separate_channels != init_model.config.separate_channels:
        weights = convert_channel_layout(weights, model_config.image_channels, model_config.separate_channels)
    model.load_weights(weights, source="the --init-from model")
    return model


def _check_operator(operator: Any, model_config: IDMConfig) -> None:
    """Refuse, before anything runs, an operator that this model cannot be trained with."""
    check_plugin_operator(operator)  # a new operator's slip (a setting left out of config()) named before anything runs
    if model_config.invertible != "none" and model_config.recompute:
        refuse_nonlinear_pinv(operator)  # the memory-saving backward cannot recompute an iterative A_dagger
    if callable(getattr(operator, "check_draws", None)):
        operator.check_draws()  # an operator family's range that its operator refuses, named before anything runs


def _operator_config(operator: Any) -> dict[str, Any]:
    """What a run records of its operator: a toolkit operator's ``config()``, any other physics' class name."""
    return operator.config() if callable(getattr(operator, "config", None)) else {"class": type(operator).__name__}


def _check_images(dataset: Dataset, operator: Any, channels: int, what: str) -> tuple[int, ...]:
    if len(dataset) == 0:
        raise ValueError(f"the {what} dataset is empty")
    first = torch.as_tensor(dataset[0])
    if first.dim() != 3:
        raise ValueError(f"{what} items must be (C, H, W) tensors, got shape {tuple(first.shape)}")
    if first.shape[0] != channels:
        raise ValueError(f"{what} items have {first.shape[0]} channel(s) but the model reconstructs {channels} "
                         "(IDMConfig.image_channels; tasks.get(NAME).model_defaults() gives a task's)")
    shape = getattr(operator, "image_shape", None)
    if shape is not None and what == "training" and tuple(first.shape) != tuple(shape):
        raise ValueError(f"training items have shape {tuple(first.shape)} but the operator acts on {tuple(shape)}")
    return tuple(first.shape)


def _load_validation(val_dataset: Dataset, hw: tuple[int, int], limit: int) -> Tensor:
    """Up to ``limit`` validation images, centre-cropped to ``hw``: ``(N, C, h, w)``; one smaller than ``hw`` is
    an error naming it."""
    from tasks.data import center_crop

    n = min(len(val_dataset), limit)
    if n == 0:
        raise ValueError("the validation dataset is empty")
    name_of = getattr(val_dataset, "item_name", lambda i: f"number {i}")
    images = []
    for i in range(n):
        x = torch.as_tensor(val_dataset[i], dtype=torch.float32)
        if x.shape[-2] < hw[0] or x.shape[-1] < hw[1]:
            raise ValueError(f"validation image {name_of(i)} is {x.shape[-2]}x{x.shape[-1]}, smaller than the training "
                             f"crop {hw[0]}x{hw[1]}")  # fmt: skip
        images.append(center_crop(x, hw))
    return torch.stack(images)




#: The weights the optimizer moves, in the checkpoints of a run with an EMA (whose ``model.safetensors`` is the average).
TRAINING_WEIGHTS_NAME = "training_weights.safetensors"


def _write_checkpoint(
    folder: Path, model: IDM, optimizer: torch.optim.Optimizer, iteration: int, seconds: float, env: DistEnv, ema: EMA | None
) -> None:
    if ema is None:
        model.save_pretrained(folder)
        write_trainer_state(folder, optimizer, iteration, seconds, env.world_size)
        return
    save_tensors(model.state_dict(), folder / TRAINING_WEIGHTS_NAME)
    with ema.swapped_into(model):
        model.save_pretrained(folder)
    write_trainer_state(folder, optimizer, iteration, seconds, env.world_size, ema_updates=ema.updates)


def _resume_ema(folder: Path, model: IDM, state: dict[str, Any], ema: EMA) -> None:
    """For a checkpoint of a run with an EMA: ``ema`` was built from ``model`` while it held the checkpoint's
    averaged weights; put the weights the optimizer moves into ``model`` and the update count into ``ema``."""
    with resuming_from(folder):
        if not (folder / TRAINING_WEIGHTS_NAME).is_file() or not isinstance(state.get("ema_updates"), int):
            raise CheckpointError(f"{folder} has no {TRAINING_WEIGHTS_NAME} or no EMA update count, but the run keeps an EMA")
        model.load_weights(load_tensors(folder / TRAINING_WEIGHTS_NAME), source=folder / TRAINING_WEIGHTS_NAME)
    ema.updates = state["ema_updates"]


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode within the block (validation: a prior's dropout off, so that the score is of the
    weights alone and draws nothing from the random generators that training goes on with), its mode put back after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _read_checkpoint(folder: Path) -> tuple[IDM, dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """Model, trainer state, optimizer tensors and RNG tensors of a checkpoint, with a clear error if any is broken."""
    return read_checkpoint_files(folder, IDM.from_pretrained)


#: The task a run started from Python records unless given one (:func:`train`'s ``task``).
PYTHON_TASK = "custom"


def train(
    model_config: IDMConfig,
    dataset: Dataset,
    operator: Any,
    out: str | os.PathLike,
    config: TrainConfig,
    *,
    task: str = PYTHON_TASK,
    task_info: dict[str, Any] | None = None,
    val_dataset: Dataset | None = None,
    val_limit: int = 16,
    init_model: IDM | None = None,
    metric_transform: Callable[[Tensor], Tensor] | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    started_at: float | None = None,
    env: DistEnv | None = None,
    settings: dict[str, Any] | None = None,
    more_sizes: Sequence[tuple[Dataset, Any]] = (),
    say: Callable[[str], None] = print,
) -> TrainResult:
    """Fine-tune an IDM end to end; resumable, multi-process under torchrun.

    Args:
        model_config: the architecture; ``unet`` is a prior folder, ``"tiny"`` or ``"sd15"``.
        dataset: training items, float ``(C, H, W)`` in [0, 1] (random crops of
            the operator's image size); ``set_epoch(e)`` is called when present.
        operator: the forward model for ``(C, H, W)`` images (deepinv
            ``LinearPhysics``; ``resample(seed)`` gives a fresh random draw).
            A toolkit operator is recorded by its ``config()``, which resuming
            checks; any other physics by its class name only, so resuming cannot
            tell it from another of its class, and the command line cannot
            rebuild it (load the model in Python, with that physics).
        out: the run folder (see :mod:`idm.training.run_folder`).
        config: :class:`TrainConfig`.
        task: task name recorded in checkpoints (checked by :func:`load_trained`).
        task_info: further JSON-able facts that define the run (color mode, crop...).
        val_dataset: optional validation images (centre-cropped to the training size).
        init_model: a trained IDM to start a fresh run from (warm start, e.g. a
            shipped model): its U-Net architecture and all its weights, instead
            of the prior folder's weights and freshly initialised injectors.
            ``model_config`` must describe it (e.g. ``init_model.config`` with
            another ``recompute``); its ``unet`` is then only a record (a
            shipped model names its prior, which need not exist as a folder).
            Ignored on resume.
        metric_transform: maps ``(B, C, H, W)`` outputs/targets to the images
            PSNR (validation) and the loss's SSIM term are computed on (e.g.
            MRI magnitude); identity by default.
        resume: continue from the latest checkpoint in ``out``.
        device: ``cuda`` / ``cpu``; under torchrun each process uses ``cuda:LOCAL_RANK``.
        started_at: ``time.monotonic()`` when the command started (the
            ``max_minutes`` budget counts from there; default: now).
        env: the distributed environment (default: detected from torchrun's variables).
        settings: extra JSON-able facts stored with the run but not checked on resume.
        more_sizes: ``(dataset, operator)`` pairs of other image sizes (the same items cropped to another
            size, and the operator for that size): iteration ``i`` trains on pair ``i % K`` of
            ``((dataset, operator), *more_sizes)``, so a model learns square and wide images alike (the
            batches of one iteration share a size). Validation and the recorded ``operator`` use the first.
        say: where rank 0's messages go.

    Returns:
        :class:`TrainResult`. Raises ``ValueError`` subclasses (with nothing
        written to ``out``) for bad data, a mismatched resume, a prior that is
        not a diffusers model, or a damaged checkpoint.
    """
    started_at = time.monotonic() if started_at is None else started_at
    env = env or distributed.detect()
    device = torch.device(device)
    if config.batch_size % env.world_size:
        raise ValueError(
            f"--batch-size {config.batch_size} is the global batch and must be a multiple of the "
            f"{env.world_size} processes"
        )
    channels = model_config.image_channels
    if config.random_phase and channels != 2:
        raise ValueError(f"random_phase needs complex images (2 channels: real, imaginary), as the mri task's; "
                         f"this model reconstructs {channels}-channel images")  # fmt: skip
    sizes = [(dataset, operator), *more_sizes]
    for _, size_operator in sizes:
        _check_operator(size_operator, model_config)
    shapes = [_check_images(d, op, channels, "training") for d, op in sizes]
    shape = shapes[0]
    identity = {
        "task": task,
        "task_info": task_info or {},
        "operator": _operator_config(operator),
        "model": _model_identity(model_config),
        "training": config.identity(),
        "data": {"items": len(dataset), "shape": list(shape)},
    }
    if more_sizes:  # absent for one size, so that the runs before this option resume as they were
        identity["more_sizes"] = [{"operator": _operator_config(op), "shape": list(shp)}
                                  for (_, op), shp in zip(more_sizes, shapes[1:])]  # fmt: skip
    shards = ShardedBatches(dataset, config.batch_size, config.seed, env.rank, env.world_size, config.augment,
                            random_phase=config.random_phase, image_noise=config.image_noise,
                            more_datasets=[d for d, _ in more_sizes])  # checked before the run folder is written
    folder = RunFolder(out, RUN_FORMAT)
    val_images = None
    if val_dataset is not None:
        _check_images(val_dataset, operator, channels, "validation")
        val_images = _load_validation(val_dataset, shape[-2:], val_limit)
    ckpt = folder.prepare(identity, resume, hints=RESUME_HINTS, recorded_identity=_recorded_identity, lock=env.is_main)

    try:  # from here on, leave the process group and give back the run folder's lock whatever happens
        device = distributed.setup(env, device)
        precision = training_precision(config.precision, device)
        if ckpt is not None and env.is_main:
            warn_if_arithmetic_changed(folder.read_config(ckpt / RUN_NAME), precision)
        torch.manual_seed(config.seed)  # the initialisation of fresh weights (tiny / sd15 / injectors)
        start, seconds_before = 0, 0.0
        if ckpt is not None:
            model, state, opt_tensors, rng_tensors = _read_checkpoint(ckpt)
            _check_resumed_prior(model_config.unet, model, ckpt)
            model.config = model.config.replace(keep_attention=model_config.keep_attention)  # this chunk's choice
            start, seconds_before = state["iteration"], float(state.get("seconds", 0.0))
        else:
            model = _fresh_model(model_config, init_model)
        model.to(device).train()
        model.check_deterministic()  # before the run folder is written
        ema = EMA(model, config.ema_decay) if config.ema_decay else None  # resumed: from the checkpoint's averages
        if ema is not None and ckpt is not None:
            _resume_ema(ckpt, model, state, ema)
        optimizer = make_optimizer(model, config.lr, config.scalar_lr_mult)
        if ckpt is not None:
            with resuming_from(ckpt):
                restore_optimizer(optimizer, opt_tensors, state["optimizer"])  # Adam moves its state to the parameters' device
                restore_rng(rng_tensors, state.get("rng", {}))

        run_config = {
            "identity": identity,
            "settings": {
                **config.settings(),
                "hardware": hardware_name(device),  # also for runs started from Python
                **(settings or {}),
                "world_size": env.world_size,
                "device": device.type,
                "arithmetic": precision,  # what the precision ("auto": by device) meant for this chunk
            },
            "model_config": model.export_config(),
        }
        if env.is_main:  # the one process that records the run
            run_config["settings"]["prior_sha256"] = _prior_fingerprint(model_config.unet, ckpt)
        log = folder.begin(run_config, ckpt, start, config.iters, say) if env.is_main else None
        net = distributed.wrap_ddp(model, env, device)

        loader = iteration_loader(shards, start, config.iters, config.num_workers, pin_memory=device.type == "cuda")
        operators = [op for _, op in sizes]
        randomize = config.randomize_operator and all(callable(getattr(op, "resample", None)) for op in operators)
        noise_init = model_config.init == "noise"
        loss_fn = ReconstructionLoss(config.ssim_weight, metric_transform, log_form=config.log_loss)

        def step(index: int, batch: Tensor) -> Tensor:
            x = batch.to(device, non_blocking=True)
            op = operators[index % len(operators)]  # the operator of this iteration's image size
            if randomize:
                op = op.resample(seeds.derive_seed(config.seed, seeds.OPERATOR, index, bits=32))
            set_learning_rate(optimizer, config.lr_at(index))
            with torch.no_grad():
                y = op.A(x)
            noise = None
            if noise_init:  # drawn for the global batch and sliced, so K processes compute what one does (as pretrain)
                shape = (x.shape[0] * env.world_size, *x.shape[1:])
                drawn = torch.randn(shape, generator=seeds.generator(config.seed, seeds.NOISE, index))
                noise = seeds.rows_of_rank(drawn, env.rank, env.world_size).to(device)
            pieces = micro_batch_slices(x.shape[0], config.micro_batch)
            runner = net if len(pieces) == 1 else model  # several pieces: gradients averaged once, after the last

            def loss_of(rows: slice) -> Tensor:
                part = (lambda t: t) if len(pieces) == 1 else (lambda t: t[rows])  # noqa: E731 (y as the physics made it)
                with autocast_for(device.type, precision):
                    x_hat = runner(part(y), op, noise=None if noise is None else part(noise))
                return loss_fn(x_hat.float(), part(x))

            optimizer.zero_grad(set_to_none=True)
            loss = backward_in_micro_batches(loss_of, x.shape[0], config.micro_batch)
            if len(pieces) > 1:
                distributed.average_gradients(model, env)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            return loss

        transform = metric_transform or (lambda t: t)

        def validate(iteration: int) -> float:
            from idm.metrics import psnr

            scores = []
            # the same start noise at every validation (init="noise"): scores comparable across iterations and resumes
            gen = seeds.generator(config.seed, seeds.VALIDATION, device=device) if noise_init else None
            with torch.no_grad(), _evaluating(model), (ema.swapped_into(model) if ema is not None else contextlib.nullcontext()):
                for chunk in torch.split(val_images, max(1, config.batch_size // env.world_size)):
                    x = chunk.to(device)
                    y = operator.A(x)  # float32, outside autocast (as in training)
                    with autocast_for(device.type, precision):
                        x_hat = model(y, operator, generator=gen).float()
                    a, b = transform(x_hat).clamp(0, 1), transform(x)
                    scores.extend(psnr(a[i], b[i]) for i in range(a.shape[0]))
            finite = [s for s in scores if math.isfinite(s)]
            return sum(finite) / len(finite) if finite else float("inf")

        def save(iteration: int, seconds: float) -> None:
            folder.save_checkpoint(
                iteration,
                lambda tmp: _write_checkpoint(tmp, model, optimizer, iteration, seconds, env, ema),
                {**run_config, "iteration": iteration},
                config.keep,
            )

        deadline = None if config.max_minutes is None else started_at + 60.0 * config.max_minutes
        result = run_loop(
            start=start,
            stop=config.iters,
            batches=loader,
            step=step,
            lr_at=config.lr_at,
            save=save,
            cadence=Cadence(config.checkpoint_every, config.log_every, config.val_every or config.checkpoint_every),
            env=env,
            device=device,
            log=log,
            validate=validate if val_images is not None else None,
            deadline=deadline,
            seconds_before=seconds_before,
            progress=config.progress,
            save_estimate=checkpoint_time_guess(model),
            desc=f"idm train {task}",
            checkpoints=folder.checkpoints_dir,
            bf16=precision == "bf16",
        )
    except BaseException as err:
        named = distributed.end(env, folder.unlock, err)
        if named is not err:
            raise named from err
        raise
    distributed.end(env, folder.unlock)
    return TrainResult(result, folder.out, folder.latest(), resumed_from=start)
