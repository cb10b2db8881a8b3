"""``IDMConfig``: everything that defines an IDM network's architecture."""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

INVERTIBLE_CHOICES = ("none", "steps", "both")
INIT_CHOICES = ("pinv", "noise")
SCHEDULE_CHOICES = ("learned", "ddpm")
PRIOR_RANGE_CHOICES = ("unit", "symmetric")
PINV_MAPPING_CHOICES = ("measurements", "images")


@dataclass(frozen=True)
class IDMConfig:
    """Architecture of an :class:`idm.IDM`.

    Attributes:
        unet: ``"tiny"`` (random ``UNet2DModel`` of 0.40M parameters, 0.35M once pruned, for tests),
            ``"sd15"`` (the Stable Diffusion v1.5 U-Net architecture, random
            init), or the path of a local diffusers U-Net folder
            (``UNet2DConditionModel`` such as SD v1.5's ``unet`` subfolder, or
            ``UNet2DModel`` such as the toolkit's own priors).
        image_channels: channels of the images (1 gray, 3 RGB, 2 complex MRI).
        steps: ``T``, the number of sampling steps.
        invertible: ``"none"`` (plain T-step network), ``"steps"`` (wired
            steps), ``"both"`` (wired steps and wired U-Net blocks).
        recompute: run the memory-saving backward (rebuild inputs from
            outputs; the last step's graph is kept from the forward, as its
            backward would rebuild it first). With ``invertible="none"`` it
            checkpoints each step but the last (``torch.utils.checkpoint``).
            Does not change the state dict.
        injectors: measurement injectors (paper Eqs. 6-7), separate weights per
            step: one after each module of the U-Net's groups (equal-width
            resnets and attention blocks) and one after each channel-changing
            resnet before a group, with every ``invertible`` (wired or not;
            ``model.eps_net.describe()`` lists them). An injector at a scale
            ``r`` (image size / feature size) needs a feature width divisible
            by ``r**2``.
        init: ``"pinv"`` (``x_T = sqrt(abar_T) A^+ y``) or ``"noise"``.
        schedule: ``"learned"`` (IDM: learnable ``abar``) or ``"ddpm"`` (fixed,
            DDNM's timesteps of the 1000-step linear schedule).
        time_input: keep the U-Net's time embedding and feed it the DDPM
            timestep (only with ``schedule="ddpm"``, to reproduce DDNM).
        keep_scales: U-Net scales kept (``None``: for a ``UNet2DConditionModel``
            all but the two deepest, as the authors pruned SD v1.5 (2 of its
            4), and at least 1, so a 3-scale one keeps 1; all for a
            ``UNet2DModel``).
        keep_mid: keep the U-Net's mid block (``None``: only when no scale is pruned).
        pixel_unshuffle: ``s`` (``None``: 2 for ``UNet2DConditionModel``, 1 otherwise).
        injector_kernel: kernel size of the injectors' convolutions.
        alpha_init: initial value of the learnable ``alpha`` (``abar = cumprod(alpha)``).
        prior_range: the value range the U-Net works in. Images and
            reconstructions are always in the task's range (``[0, 1]``);
            ``"symmetric"`` maps them to ``[-1, 1]`` inside the network
            (``x -> 2 x - 1``, ``y -> 2 y - A 1``), for priors trained that
            way; ``"unit"`` leaves them. ``None``: ``"symmetric"`` when the
            U-Net folder's ``idm_prior.json`` says ``data_range [-1, 1]``
            (priors from ``idm pretrain``), else ``"unit"``.
        pinv_mapping: how ``A^+ y`` reaches the ``"symmetric"`` range, where the
            network's initial state and injectors see it: ``"measurements"``
            (``A^+ (2 y - A 1)``, the pseudo-inverse of the mapped measurements;
            the default, exact for exact pseudo-inverses) or ``"images"``
            (``2 A^+ y - 1``, the mapped pseudo-inverse). Use ``"images"`` for
            approximate pseudo-inverses such as CT's filtered back-projection,
            which turns the sinogram of the constant image ``1`` into streaks
            and bright corners (on two clinical slices at 256x256, 60 views,
            the network's ``A^+ y`` is 34.9 / 33.7 dB that way, 36.6 / 34.8 dB
            mapped: ``python -m benchmarks.ct_start``). The range-null-space
            step is the same function either way
            (``idm.step.project_to_measurements``).
        final_projection: project the reconstruction onto the measurements,
            ``x <- x + A^+ (y - A x)``, after the last step (no parameters).
            The authors' network returns ``x_1 + s_out x_2`` of the first-level
            wiring, which mixes the last projected ``x0`` with the previous
            state, so ``A x_hat != y`` (4.5 % relative residual for the first
            shipped CS model at 50 %). The projection only removes the error's
            part in the range of ``A^T``, so it never lowers PSNR on noise-free
            measurements. For an operator with an exact pseudo-inverse
            (orthonormal CS rows, masks, Cartesian MRI) ``A^+`` is the
            operator's own; for one whose ``A_dagger`` is approximate
            (``exact_pinv`` false: CT's filtered back-projection, which is
            no projection) it is the minimum-norm least-squares solve of
            :func:`operators.least_squares.least_squares_solve`, the same
            solver as DDNM's projection in ``benchmarks/``.
        projection_cg_iters: conjugate-gradient steps of that least-squares
            solve (only for operators whose ``exact_pinv`` is false): two
            operator applications each. The default 20 is DDNM's.
        separate_channels: run the U-Net and the injectors on each image
            channel as its own one-channel image (a grey prior for colour
            images: ``(B, C, H, W)`` is folded to ``(B * C, 1, H, W)`` around
            them; the operator and the range-null-space step still see the
            whole image). ``False`` (the default) feeds all channels to one
            U-Net whose first and last convolutions are tiled over them: apart
            from the injectors it starts out treating the colours as one grey
            image, so it fills inpainting holes in grey and must learn colour.
        keep_attention: with ``invertible="both"`` and ``recompute``, the wired
            U-Net blocks keep their attention products from the forward for
            their recomputation in the backward, which then skips the
            attention kernels (:mod:`idm.attention_replay`): faster training,
            for the memory of one step's attention inputs and outputs
            (``Q, K, V`` and the result of every attention layer). Does not
            change the state dict or the results; without the wired blocks'
            memory-saving backward it does nothing.
    """

    unet: str = "tiny"
    image_channels: int = 1
    steps: int = 3
    invertible: str = "both"
    recompute: bool = True
    injectors: bool = True
    init: str = "pinv"
    schedule: str = "learned"
    time_input: bool = False
    keep_scales: int | None = None
    keep_mid: bool | None = None
    pixel_unshuffle: int | None = None
    injector_kernel: int = 1
    alpha_init: float = 0.5
    prior_range: str | None = None
    pinv_mapping: str = "measurements"
    final_projection: bool = False
    projection_cg_iters: int = 20
    separate_channels: bool = False
    keep_attention: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"IDMConfig: {message}")

        def is_int(value: Any) -> bool:  # bool is an int to Python, never a count here
            return isinstance(value, int) and not isinstance(value, bool)

        # NumPy scalars (np.int64 steps, np.float32 alpha) become Python numbers: the config is saved as JSON
        for name in ("image_channels", "steps", "keep_scales", "pixel_unshuffle", "injector_kernel", "projection_cg_iters"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
                object.__setattr__(self, name, int(value))
        if isinstance(self.alpha_init, numbers.Real) and not isinstance(self.alpha_init, (bool, np.bool_)):
            object.__setattr__(self, "alpha_init", float(self.alpha_init))

        if isinstance(self.unet, os.PathLike):  # a pathlib.Path to a folder: recorded as its string (JSON)
            object.__setattr__(self, "unet", os.fspath(self.unet))
        for name in ("recompute", "injectors", "time_input", "final_projection", "separate_channels", "keep_attention"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        need(self.keep_mid is None or isinstance(self.keep_mid, bool), f"keep_mid must be None, True or False, got {self.keep_mid!r}")
        need(isinstance(self.unet, str) and bool(self.unet), f"unet must be 'tiny', 'sd15' or a folder path, got {self.unet!r}")
        need(is_int(self.image_channels) and self.image_channels > 0, f"image_channels must be a positive int, got {self.image_channels!r}")
        need(is_int(self.steps) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps!r}")
        need(self.invertible in INVERTIBLE_CHOICES, f"invertible must be one of {INVERTIBLE_CHOICES}, got {self.invertible!r}")
        need(self.init in INIT_CHOICES, f"init must be one of {INIT_CHOICES}, got {self.init!r}")
        need(self.schedule in SCHEDULE_CHOICES, f"schedule must be one of {SCHEDULE_CHOICES}, got {self.schedule!r}")
        need(not self.time_input or self.schedule == "ddpm", "time_input=True needs schedule='ddpm' (a learned schedule has no timesteps)")
        need(self.keep_scales is None or (is_int(self.keep_scales) and self.keep_scales >= 1), f"keep_scales must be None or an int >= 1, got {self.keep_scales!r}")
        need(self.pixel_unshuffle is None or (is_int(self.pixel_unshuffle) and self.pixel_unshuffle in (1, 2, 4)),
             f"pixel_unshuffle must be None, 1, 2 or 4, got {self.pixel_unshuffle!r}")
        need(is_int(self.injector_kernel) and self.injector_kernel in (1, 3), f"injector_kernel must be 1 or 3, got {self.injector_kernel!r}")
        need(isinstance(self.alpha_init, float) and 0.0 < self.alpha_init < 1.0,
             f"alpha_init must be a number in (0, 1), got {self.alpha_init!r}")
        need(self.prior_range is None or self.prior_range in PRIOR_RANGE_CHOICES, f"prior_range must be None or one of {PRIOR_RANGE_CHOICES}, got {self.prior_range!r}")
        need(self.pinv_mapping in PINV_MAPPING_CHOICES, f"pinv_mapping must be one of {PINV_MAPPING_CHOICES}, got {self.pinv_mapping!r}")
        need(is_int(self.projection_cg_iters) and self.projection_cg_iters >= 1,
             f"projection_cg_iters must be an int >= 1, got {self.projection_cg_iters!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IDMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"IDMConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "IDMConfig":
        return dataclasses.replace(self, **changes)
