"""The diffusion prior shared by the diffusion baselines, and the map into its value space.

Conventions (see ``benchmarks/methods.py``):

* The prior is a diffusers ``UNet2DModel`` predicting the noise ``eps`` on the
  standard 1000-step linear DDPM schedule (betas 1e-4 .. 0.02), trained on
  images scaled to [-1, 1]; it is called as ``unet(x_t, t).sample``.
* The tasks' images live in the image space, normally [0, 1] (MRI: real /
  imaginary channels, roughly in [-1, 1]; every task gets the same map).
  :class:`PriorSpace` is the ONE place that converts between the two::

      x_model = 2 x - 1                 (image -> prior space)
      x       = (x_model + 1) / 2       (prior space -> image)
      y_model = 2 y - A(1)              (measurement of x -> measurement of x_model)

  The last line is exact because ``A`` is linear: ``A(2x - 1) = 2 A x - A 1``.

:func:`load_prior` reads a prior folder (offline) with clear errors, and
:class:`DiffusionPrior` wraps the U-Net with its schedule and evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm.step import DDPM_SCHEDULE, ddpm_alphas_cumprod
from operators import image_shape_of

class PriorError(ValueError):
    """A diffusion prior (folder, U-Net or schedule) cannot be used by the baselines."""


# ---------------------------------------------------------------------------------------
# image space <-> prior space
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PriorSpace:
    """The affine map ``x_model = scale * x + offset`` between image and prior space.

    Defaults give ``x_model = 2 x - 1`` (images in [0, 1] -> [-1, 1]).
    """

    scale: float = 2.0
    offset: float = -1.0

    def to_model(self, x: Tensor) -> Tensor:
        """Image ``x`` -> prior-space image ``scale * x + offset``."""
        return self.scale * x + self.offset

    def to_image(self, x_model: Tensor) -> Tensor:
        """Prior-space image -> image ``(x_model - offset) / scale``."""
        return (x_model - self.offset) / self.scale

    def measurement_to_model(self, y: Tensor, op: Any) -> Tensor:
        """``y = A x`` -> ``A x_model = scale * y + offset * A(1)`` (exact for linear ``A``).

        ``op`` is any deepinv ``LinearPhysics``; the all-ones image is shaped as
        ``op.image_shape`` where the operator has it, else as ``A^T y``.
        """
        ones = torch.ones(ones_shape(y, op), dtype=real_dtype(y), device=y.device)
        return self.scale * y + self.offset * op.A(ones)

    def measurement_to_image(self, y_model: Tensor, op: Any) -> Tensor:
        """Inverse of :meth:`measurement_to_model`."""
        ones = torch.ones(ones_shape(y_model, op), dtype=real_dtype(y_model), device=y_model.device)
        return (y_model - self.offset * op.A(ones)) / self.scale


def real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def ones_shape(y: Tensor, op: Any) -> tuple[int, ...]:
    """``(1, C, H, W)`` of the images ``op`` acts on."""
    return (1, *image_shape_of(op, y[:1]))


def image_shape(y: Tensor, op: Any) -> tuple[int, ...]:
    """``(B, C, H, W)`` of the images behind the measurements ``y``."""
    return (y.shape[0], *ones_shape(y, op)[1:])


def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise from ``generator`` only, on ``like``'s device and dtype.

    A generator on another device (e.g. a CPU generator for CUDA tensors) draws
    on its own device and the result is moved. ``None`` is refused: the
    baselines never touch the global random state.
    """
    if generator is None:
        raise ValueError("a torch.Generator is required (the baselines never use the global RNG)")
    dtype = real_dtype(like)
    if generator.device.type == like.device.type:
        return torch.randn(shape, generator=generator, device=like.device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(like.device)


def default_generator(generator: torch.Generator | None, like: Tensor, seed: int = 0) -> torch.Generator:
    """``generator``, or a fresh one seeded with ``seed`` on ``like``'s device (never the global RNG)."""
    if generator is not None:
        return generator
    return torch.Generator(device=like.device).manual_seed(seed)


# ---------------------------------------------------------------------------------------
# the prior
# ---------------------------------------------------------------------------------------
class DiffusionPrior(nn.Module):
    """An epsilon-predicting diffusers ``UNet2DModel`` on the 1000-step linear DDPM schedule.

    Args:
        unet: the ``UNet2DModel`` (``in_channels == out_channels``, with its time input).
        space: the image <-> prior-space map (default ``x_model = 2x - 1``).

    Attributes:
        alphas_cumprod: float64 ``(1000,)`` table ``abar_t`` of :func:`idm.step.ddpm_alphas_cumprod`.
        channels: image channels the prior models.

    Images with ``k * channels`` channels (``k > 1``) are modelled as ``k``
    independent images of ``channels`` channels each: a complex MRI image
    (real, imaginary) or an RGB image under a grey prior. This matches how
    the IDM adapter tiles a prior's first and last convolutions.
    """

    def __init__(self, unet: nn.Module, space: PriorSpace | None = None):
        super().__init__()
        kind = type(unet).__name__
        if kind != "UNet2DModel":
            raise PriorError(
                f"the baselines need a pixel-space diffusers UNet2DModel prior (epsilon prediction), got {kind}"
            )
        cfg = unet.config
        if cfg.in_channels != cfg.out_channels:
            raise PriorError(
                f"the prior U-Net must output as many channels as it takes (epsilon), got "
                f"in_channels={cfg.in_channels}, out_channels={cfg.out_channels}"
            )
        self.unet = unet
        self.space = space if space is not None else PriorSpace()
        # A plain float64 CPU tensor, not a buffer: ``prior.float()`` must not round the schedule.
        self.alphas_cumprod = ddpm_alphas_cumprod(
            DDPM_SCHEDULE["num_train_timesteps"], DDPM_SCHEDULE["beta_start"], DDPM_SCHEDULE["beta_end"]
        )
        # ``alphas_cumprod`` then 1 (for ``t = -1``) on each (device, dtype) used: one copy, not one per step.
        self._abar_tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`PriorError` unless images of ``shape`` ``(B, C, H, W)`` fit the prior (``C`` a multiple of its channels)."""
        if len(shape) != 4 or shape[1] % self.channels:
            raise PriorError(
                f"the prior models {self.channels}-channel images (or groups of them) but the operator's images "
                f"have shape {tuple(shape)}"
            )

    def abar(self, t: int, like: Tensor) -> Tensor:
        """``abar_t`` as a 0-d tensor in ``like``'s dtype and device; ``t = -1`` gives ``abar = 1``.

        Indexes a copy of the table kept on that device and dtype (no copy from
        the host per step, which on a GPU would wait for the queued work).
        """
        if not -1 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must be in [-1, {self.num_train_timesteps - 1}], got {t}")
        key = (like.device, real_dtype(like))
        table = self._abar_tables.get(key)
        if table is None:
            ones = self.alphas_cumprod.new_ones(1)
            table = self._abar_tables[key] = torch.cat([self.alphas_cumprod, ones]).to(device=like.device, dtype=key[1])
        return table[t]

    def eps(self, x_t: Tensor, t: int) -> Tensor:
        """Noise estimate ``unet(x_t, t).sample`` (one NFE), in ``x_t``'s dtype.

        ``x_t``: ``(B, C, H, W)`` in the prior's space; ``C`` a multiple of
        :attr:`channels` (groups run as separate images, in one U-Net call).

        The U-Net runs in its own dtype. Images whose size is not a multiple of
        the U-Net's total downsampling are padded (replicate) and cropped, as
        :class:`idm.unets.wired_unet.WiredUNet` does.
        """
        unet = self.unet
        dtype = next(unet.parameters()).dtype
        batch, channels = x_t.shape[:2]
        height, width = x_t.shape[-2:]
        h = self.padded(x_t.to(dtype).reshape(-1, self.channels, height, width))  # channel groups as separate images
        timestep = torch.full((h.shape[0],), int(t), device=h.device, dtype=torch.long)
        out = unet(h, timestep).sample[..., :height, :width]
        return out.reshape(batch, channels, height, width).to(x_t.dtype)

    def padded(self, x: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)`` padded (replicate, bottom and right) to a multiple of the U-Net's total
        downsampling, as :meth:`eps` pads the images it is given; ``x`` itself when no padding is needed."""
        multiple = 2 ** (len(self.unet.down_blocks) - 1)
        pad_h, pad_w = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


def load_prior(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    space: PriorSpace | None = None,
) -> DiffusionPrior:
    """Load a prior folder, or a shipped prior by name, (offline) as a :class:`DiffusionPrior` in eval mode.

    ``path`` holds a diffusers ``UNet2DModel`` (``config.json`` + weights, at
    its top or in a ``unet/`` subfolder); a diffusers scheduler config beside
    it, if any, must describe the 1000-step linear 1e-4..0.02 epsilon schedule.
    Without ``space``, the prior's value range is the one its ``idm_prior.json``
    records (what IDM models built on it use too), else diffusers' [-1, 1].
    Raises :class:`PriorError` with the reason otherwise.
    """
    from idm.checkpoint import CheckpointError
    from idm.pretrain import prior_folder
    from idm.unets.factory import UNetSourceError, check_prior_schedule, load_unet_folder, read_prior_range

    try:
        folder = Path(prior_folder(path))  # a pretrain run stands for its prior, a shipped prior's name for its folder
    except CheckpointError as err:
        raise PriorError(str(err)) from None
    if not folder.is_dir():
        raise PriorError(f"prior folder {str(folder)!r} does not exist")
    try:
        unet = load_unet_folder(folder)
        recorded = read_prior_range(folder)
    except UNetSourceError as err:
        raise PriorError(f"cannot load the diffusion prior in {str(folder)!r}: {err}") from None
    try:
        check_prior_schedule(folder)
    except UNetSourceError as err:
        raise PriorError(str(err)) from None
    if space is None and recorded is not None:  # images in [0, 1] -> the recorded [low, high]
        if not recorded[0] < recorded[1]:
            raise PriorError(f"the prior in {str(folder)!r} records an empty data_range {list(recorded)}")
        space = PriorSpace(scale=recorded[1] - recorded[0], offset=recorded[0])
    prior = DiffusionPrior(unet, space=space)
    prior.to(device=device, dtype=dtype) if dtype is not None else prior.to(device=device)
    return prior.eval().requires_grad_(False)
