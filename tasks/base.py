"""A task: where a concrete forward model meets a dataset, with the defaults to train for it.

A task is a :class:`Task` value in a module of this package named ``TASK``
(``tasks/cs.py`` etc.); :func:`tasks.get` finds it by name. It knows

* the operator (registry name, default keyword arguments, which command-line
  operator flags apply) and whether it is redrawn every training iteration;
* the images: channels, colour mode, default training crop, and a loader
  that turns data paths into a ``Dataset`` of ``(C, H, W)`` float tensors in [0, 1];
* the training schedule defaults (iterations, learning rate, lr-halving
  milestones as fractions of the run, batch size);
* which image PSNR is measured on (:meth:`Task.metric_image`, e.g. MRI magnitude).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

PathsArg = Union[str, Sequence[str]]
#: A training crop: a square's side, or ``(height, width)``.
CropArg = Union[int, tuple[int, int]]
#: ``loader(task, paths, crop, augment, seed) -> Dataset``
Loader = Callable[["Task", PathsArg, Optional[CropArg], bool, int], Dataset]

#: Colour modes of image files and their channel counts.
IMAGE_COLORS: Mapping[str, int] = MappingProxyType({"gray": 1, "y": 1, "rgb": 3})
#: The operator settings that command-line flags set (``--ratio``, ..., ``--center-fraction``, ``--views``),
#: the same in every command; a task's ``options`` are among them.
OPERATOR_FLAGS: tuple[str, ...] = ("ratio", "mode", "block", "mask", "acceleration", "center_fraction", "views")


@dataclass(frozen=True)
class Schedule:
    """Training defaults: ``iters`` iterations, Adam ``lr`` multiplied by ``gamma`` at
    ``milestones`` (fractions of ``iters``), global ``batch_size``."""

    iters: int = 50_000
    lr: float = 1e-4
    milestones: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    gamma: float = 0.5
    batch_size: int = 8

    def milestone_iterations(self, iters: int | None = None) -> tuple[int, ...]:
        """The milestones as iteration numbers for a run of ``iters`` (default: :attr:`iters`)."""
        n = self.iters if iters is None else iters
        return tuple(sorted({max(1, round(f * n)) for f in self.milestones}))


def mask_mixture(mask: Any) -> Optional[list[tuple[str, float]]]:
    """The ``(kind, weight)`` pairs of a mask mixture such as ``"random,box"`` (equal weights) or
    ``"random:1,box:2"`` (a box in two draws of three); ``None`` when ``mask`` is not a comma-separated
    list (one kind, a mask file or an array).

    Raises:
        ValueError: a kind named twice, an empty item, or a weight that is not a positive finite number.
    """
    if not (isinstance(mask, str) and "," in mask):
        return None
    pairs: list[tuple[str, float]] = []
    for item in (part.strip() for part in mask.split(",")):
        kind, sep, weight_text = item.partition(":")
        kind = kind.strip()
        if not kind:
            raise ValueError(f"--mask {mask!r}: an empty item; a mixture is KIND[:WEIGHT],KIND[:WEIGHT],...")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            weight = float("nan")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--mask {mask!r}: the weight of {kind!r} must be a positive number, got {weight_text!r}")
        if any(kind == seen for seen, _ in pairs):
            raise ValueError(f"--mask {mask!r}: {kind!r} is named twice; give it a weight instead ({kind}:2)")
        pairs.append((kind, weight))
    return pairs


def image_folder_loader(task: "Task", paths: PathsArg, crop: Optional[CropArg], augment: bool, seed: int) -> Dataset:
    """Images of any format ``tasks.data`` reads, in the task's colour mode."""
    from tasks.data import ImageFolderDataset

    return ImageFolderDataset(paths, color=task.color, crop=crop, augment=augment, seed=seed)


@dataclass(frozen=True)
class Task:
    """One inverse problem's defaults (see the module docstring).

    Attributes:
        name: registry key (``idm train --task NAME``).
        operator: name in the ``operators`` registry.
        operator_defaults: keyword arguments of the operator (besides
            ``img_size``, ``channels``, ``seed``).
        options: operator arguments that may be overridden: by the command
            line's flags for those among :data:`OPERATOR_FLAGS`, by Python
            callers (:meth:`operator_kwargs`) for any.
        channels: image channels the network reconstructs.
        color: colour mode of image files (``"gray"``, ``"y"``, ``"rgb"``) or
            a loader-specific word (``"magnitude"``, ``"hu"``).
        crop: default training crop (square).
        schedule: training defaults.
        randomized: draw a fresh operator every training iteration (for
            operators with random parts; deterministic ones are unaffected).
        family_choices: settings a training family draws from a list when its
            component has them (e.g. the box position of inpainting masks), see
            :meth:`make_training_operator`.
        loader: builds the dataset (default: image folders in ``color``).
        metric: ``"image"`` (PSNR on the images) or ``"magnitude"`` (on the
            magnitude of 2-channel real/imaginary images, for MRI).
        size_bound: a trained model serves its training image size only
            (CT: the streaks of a few views scale with the pixel count), so
            ``idm reconstruct`` and ``idm benchmark`` warn at other sizes.
        pinv_mapping: ``IDMConfig.pinv_mapping`` of models ``idm train``
            builds for the task (``"images"`` when ``A^+`` is approximate).
        alpha_init: ``IDMConfig.alpha_init`` of those models (0.5 as the
            authors; close to 1 makes the untrained network return about
            ``A^+ y``, a better start when ``A^+ y`` is already good).
        final_projection: ``IDMConfig.final_projection`` of those models
            (on for CS and CT, where it raised both PSNR and SSIM of the
            shipped models; off for MRI and inpainting, where it lowered SSIM).
        separate_channels: ``IDMConfig.separate_channels`` of those models
            (on for inpainting: a grey prior fills each colour channel).
        description: one line for ``--help`` and the README.
    """

    name: str
    operator: str
    operator_defaults: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    channels: int = 1
    color: str = "gray"
    crop: int = 256
    schedule: Schedule = Schedule()
    randomized: bool = True
    family_choices: Mapping[str, tuple] = field(default_factory=dict)
    loader: Loader = image_folder_loader
    metric: str = "image"
    size_bound: bool = False
    pinv_mapping: str = "measurements"
    alpha_init: float = 0.5
    final_projection: bool = False
    separate_channels: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.metric not in ("image", "magnitude"):
            raise ValueError(f"task {self.name}: metric must be 'image' or 'magnitude', got {self.metric!r}")
        object.__setattr__(self, "operator_defaults", MappingProxyType(dict(self.operator_defaults)))
        if self.color in IMAGE_COLORS and IMAGE_COLORS[self.color] != self.channels and self.loader is image_folder_loader:
            raise ValueError(f"task {self.name}: color {self.color!r} gives {IMAGE_COLORS[self.color]} channel(s), not {self.channels}")

    # ---- variants --------------------------------------------------------------------
    def with_color(self, color: str) -> "Task":
        """The same task on images read in another colour mode (image-file tasks only)."""
        if self.loader is not image_folder_loader:
            raise ValueError(f"task {self.name} reads its own data format; --color does not apply")
        if color not in IMAGE_COLORS:
            raise ValueError(f"color must be one of {', '.join(IMAGE_COLORS)}, got {color!r}")
        return dataclasses.replace(self, color=color, channels=IMAGE_COLORS[color])

    # ---- model -----------------------------------------------------------------------
    def model_defaults(self) -> dict[str, Any]:
        """The :class:`idm.IDMConfig` fields this task sets for the models trained on it (see the class docstring)."""
        return {"image_channels": self.channels, "pinv_mapping": self.pinv_mapping, "alpha_init": self.alpha_init,
                "final_projection": self.final_projection, "separate_channels": self.separate_channels}  # fmt: skip

    # ---- operator ------------------------------------------------------------------
    def operator_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Default operator arguments updated with ``overrides`` (``None`` values ignored)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(overrides) - set(self.options))
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            takes = ", ".join("--" + k.replace("_", "-") for k in self.options if k in OPERATOR_FLAGS) or "no operator flags"
            raise ValueError(f"task {self.name} does not use {flags} (it takes {takes})")
        return {**self.operator_defaults, **overrides}

    def check_flags(self, **overrides: Any) -> dict[str, Any]:
        """:meth:`operator_kwargs` for the operator flags a user gave (``overrides``), also refusing a flag that
        the operator they build would ignore (``--ratio`` with ``--mask box``), which would change nothing,
        silently. Commands call it before any work."""
        import operators

        kwargs = self.operator_kwargs(**overrides)
        ignored = operators.REGISTRY.get(self.operator).ignored_settings(kwargs)
        given = [key for key in ignored if overrides.get(key) is not None]
        if given:
            raise ValueError("; ".join(f"--{key.replace('_', '-')} does not apply here: {ignored[key]}" for key in given))
        return kwargs

    def make_operator(self, img_size: tuple[int, int] | int, seed: int = 0, **overrides: Any):
        """The task's operator for ``(H, W)`` images, with ``overrides`` of the defaults.

        ``seed`` fixes the random draw (permutation / mask) for operators that
        have one; ``op.resample(s)`` gives other draws.
        """
        import operators

        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        kwargs = self.operator_kwargs(**overrides)
        cls = operators.REGISTRY.get(self.operator)
        if "seed" in inspect.signature(cls.__init__).parameters:
            kwargs.setdefault("seed", seed)
        return operators.make(self.operator, img_size=tuple(img_size), channels=self.channels, **kwargs)

    def check_operator_settings(self, img_size: tuple[int, int] | None = None, **overrides: Any) -> None:
        """Raise the operator's own error for settings it refuses (a ratio outside (0, 1], no views, an
        unreadable mask file), by building it once as it would run: at ``img_size`` (the caller's first
        image; rounded up to whole CS blocks), or a mask file's own size. Without either nothing is built
        (a made-up size could blame valid settings on it). Commands call it when no model serves a
        request, so that a bad flag is named as such rather than as a model that does not exist."""
        kwargs = self.operator_kwargs(**overrides)
        mask = kwargs.get("mask")
        if isinstance(mask, (str, os.PathLike)) and str(mask) not in ("random", "box"):
            from operators.inpainting import read_mask_file

            img_size = tuple(read_mask_file(mask).shape)
        if img_size is None:
            return
        block = kwargs.get("block")
        if isinstance(block, int) and block >= 1:  # images are zero-padded to whole blocks before measuring
            img_size = tuple(-(-int(side) // block) * block for side in img_size)
        self.make_operator(tuple(img_size), **overrides)

    def make_training_operator(self, img_size: tuple[int, int] | int, seed: int = 0, **overrides: Any):
        """The operator to train on: :meth:`make_operator`, or an :class:`~operators.family.OperatorFamily`.

        A family is built when an override is a ``(low, high)`` range (e.g.
        ``ratio=(0.01, 0.5)``: one model for every ratio in it) or ``mask`` is a
        comma-separated list (``"random,box"``: a mixture, equal weights;
        ``"random:1,box:2"``: weighted, see :func:`mask_mixture`). The
        family's representative (validation, shape checks) uses the middle of
        each range; :attr:`family_choices` are added to components that have
        those settings.
        """
        from operators.conformance import check_plugin_operator
        from operators.family import Component, OperatorFamily

        ranges = {k: v for k, v in overrides.items() if isinstance(v, tuple)}
        mixture = mask_mixture(overrides.get("mask"))
        if not ranges and not mixture:
            self.check_flags(**overrides)
            return self.make_operator(img_size, seed, **overrides)
        if mixture and "mask" not in self.options:
            raise ValueError(f"task {self.name} does not use --mask")
        fixed = {k: v for k, v in overrides.items() if k not in ranges and not (mixture and k == "mask")}
        # the middle of each range; an integer setting (ranges given as ints: views, acceleration) stays an integer
        middle = {k: (lo + hi) // 2 if isinstance(lo, int) and isinstance(hi, int) else (lo + hi) / 2
                  for k, (lo, hi) in ranges.items()}  # fmt: skip
        components = []
        for kind, weight in mixture or [(None, 1.0)]:
            kind_setting = {"mask": kind} if kind else {}
            representative = self.make_operator(img_size, seed, **fixed, **middle, **kind_setting)
            check_plugin_operator(representative)  # before its config() stands for it: a setting it leaves out is lost
            base = representative.config()
            vary = {k: r for k, r in ranges.items() if k in base}
            vary.update({k: list(v) for k, v in self.family_choices.items() if k in base})
            components.append(Component(base, vary, weight))
        unused = [key for key in ranges if not any(key in c.vary for c in components)]
        if unused:  # e.g. --ratio LOW:HIGH with --mask box: the range would change nothing
            shown = ", ".join(f"--{key.replace('_', '-')} {lo}:{hi}" for key, (lo, hi) in ranges.items() if key in unused)
            settings = {**fixed, **({"mask": ",".join(kind for kind, _ in mixture)} if mixture else {})} or self.operator_defaults
            raise ValueError(f"{shown} would change nothing: the {self.operator} operator does not use it with "
                             + ", ".join(f"{k}={v!r}" for k, v in settings.items()))  # fmt: skip
        family = OperatorFamily(components, seed=seed)
        family.check_draws()  # a range the operator refuses fails here, not at a draw mid-training
        return family

    # ---- data ------------------------------------------------------------------------
    def dataset(self, paths: PathsArg, crop: Optional[CropArg] = None, augment: bool = False, seed: int = 0) -> Dataset:
        """The task's images under ``paths``: items float32 ``(channels, H, W)`` in [0, 1] (the mri task's
        complex images from fastMRI k-space: real and imaginary parts in [-1, 1], magnitude in [0, 1]).

        ``crop``: random crops of that size, a square's side or ``(height,
        width)`` (images smaller are skipped; none large enough raises
        ``tasks.data.DataError``).
        """
        return self.loader(self, paths, crop, augment, seed)

    @property
    def complex_images(self) -> bool:
        """Whether the task's images are complex, as (real, imaginary) channels in [-1, 1] (the mri task's,
        scored on their magnitude), rather than intensities in [0, 1]."""
        return self.metric == "magnitude"

    def metric_image(self, x: torch.Tensor) -> torch.Tensor:
        """The image PSNR/SSIM are measured on, ``(B, C', H, W)``: the images themselves, or the
        magnitude of complex (2-channel real/imaginary) MRI images."""
        if self.metric == "magnitude":
            return torch.linalg.vector_norm(x[:, :2], dim=1, keepdim=True)  # its gradient at 0 is 0, not NaN
        return x

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (recorded with training runs)."""
        return {
            "name": self.name,
            "operator": self.operator,
            "operator_defaults": dict(self.operator_defaults),
            "channels": self.channels,
            "color": self.color,
            "crop": self.crop,
            "randomized": self.randomized,
        }
