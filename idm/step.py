"""One DDNM sampling step (paper Eqs. 1-3) and the noise schedules IDM uses.

For step ``t`` (from ``T`` down to 1), with noise estimate ``e = eps(x_t)``::

    x0     = (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t)             # Eq. 1
    x0     = A^+ y + (I - A^+ A) x0                                # Eq. 2, range-null-space projection
    x_t-1  = sqrt(abar_t-1) x0 + sqrt(1 - abar_t-1) e              # Eq. 3, DDIM with eta = 0

DDNM's stochastic variant (``eta > 0``, used by the DDNM baseline) replaces
the last line by ``sqrt(abar_t-1) x0 + sqrt(1 - abar_t-1) (eta z + sqrt(1 - eta^2) e)``
with ``z ~ N(0, I)``, as in DDNM's reference code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from operators import unchecked_values


def project_to_measurements(x0: Tensor, op, x_pinv: Tensor, shift: float = 0.0) -> Tensor:
    """``A^+ y + (I - A^+ A) x0``: the part of ``x0`` in the null space of ``A``, plus ``A^+ y``.

    ``shift`` ``s``: computes ``(x0 + s) - A^+ A (x0 + s) + x_pinv`` instead,
    for an ``x_pinv`` that is ``A^+ y`` mapped to the prior's range as an
    image (``2 A^+ y - 1``, ``s = 1``) rather than the pseudo-inverse of the
    mapped measurements (``A^+ (2 y - A 1)``, ``s = 0``). By linearity both
    give the same result; see ``IDMConfig.pinv_mapping``.
    The operator runs outside autocast, in the dtype of ``x_pinv``, without
    its NaN/inf checks (:func:`operators.unchecked_values`: no host sync).
    """
    with torch.autocast(x0.device.type, enabled=False), unchecked_values():
        x0 = x0.to(x_pinv.dtype) + shift if shift else x0.to(x_pinv.dtype)
        return x0 - op.A_dagger(op.A(x0)) + x_pinv


def ddnm_step(
    x_t: Tensor,
    eps: Tensor,
    abar_t: Tensor,
    abar_prev: Tensor,
    op,
    x_pinv: Tensor,
    eta: float = 0.0,
    noise: Tensor | None = None,
    shift: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One DDNM step; returns ``(x_{t-1}, projected x0)``.

    Args:
        x_t: ``(B, C, H, W)`` current sample.
        eps: noise estimate for ``x_t``, same shape.
        abar_t, abar_prev: scalar tensors, cumulative alphas at ``t`` and ``t - 1`` (``abar_0 = 1``).
        op: a deepinv ``LinearPhysics`` (``A``, ``A_dagger``).
        x_pinv: ``A^+ y``, shaped like ``x_t``.
        eta: DDNM stochasticity (0 = deterministic DDIM).
        noise: ``z`` for ``eta > 0`` (drawn by the caller so that the step stays pure).
        shift: of :func:`project_to_measurements` (1 when ``x_pinv`` is ``2 A^+ y - 1``).
    """
    x0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    x0 = project_to_measurements(x0, op, x_pinv, shift)
    direction = eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddnm_step with eta > 0 needs the noise tensor z")
        direction = eta * noise + math.sqrt(1 - eta * eta) * eps
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * direction
    return x_prev, x0


#: The diffusion schedule of every prior the toolkit samples with (DDNM, DPS, ``schedule="ddpm"``): diffusers'
#: ``DDPMScheduler`` settings of the 1000-step linear DDPM, predicting the noise.
DDPM_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                 "prediction_type": "epsilon"}  # fmt: skip


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """``abar`` of the standard linear DDPM schedule, float64 ``(num_train_timesteps,)``."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def ddnm_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDNM's skip-type "uniform" timesteps, first sampled first: e.g. T=3 -> [666, 333, 0], 100 -> [990, ..., 0].

    ``floor(i * num_train_timesteps / steps)`` for ``i = steps - 1, ..., 0``: where ``steps`` divides
    ``num_train_timesteps`` these are the authors' ``range(0, num_train_timesteps, skip)``; otherwise
    still exactly ``steps`` of them, the first within one stride of the last timestep, whose pure noise
    the sampling starts from (the authors' loop runs more steps than asked there, e.g. 334 for 300).
    ``steps`` must lie in ``1 .. num_train_timesteps`` (a ``ValueError`` otherwise).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"a DDPM schedule of {num_train_timesteps} timesteps takes 1 to {num_train_timesteps} steps, got {steps}")
    return [i * num_train_timesteps // steps for i in range(steps)][::-1]


class LearnedSchedule(nn.Module):
    """IDM's learnable schedule: ``abar_t = prod_{i<=t} alpha_i`` with ``abar_0 = 1``.

    ``alpha`` is a ``(T,)`` parameter initialised to 0.5 as the authors do
    (``abar`` = 1, .5, .25, .125 for T=3) and never clamped. There is no
    timestep input to the U-Net.
    """

    def __init__(self, steps: int, alpha_init: float = 0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((steps,), float(alpha_init)))

    def abar(self) -> Tensor:
        """``(T + 1,)`` tensor ``[abar_0 = 1, abar_1, ..., abar_T]``."""
        return torch.cat([self.alpha.new_ones(1), torch.cumprod(self.alpha, dim=0)])

    def timestep(self, t: int) -> int | None:
        return None


class DDPMSchedule(nn.Module):
    """A fixed schedule read off the 1000-step linear DDPM at DDNM's timesteps.

    Used to reproduce DDNM exactly (with the U-Net's time input kept) and by
    the DDNM baseline. ``abar_0 = 1``.
    """

    def __init__(self, steps: int, num_train_timesteps: int = 1000):
        super().__init__()
        self.timesteps = ddnm_timesteps(steps, num_train_timesteps)  # [t_T, ..., t_1]
        table = ddpm_alphas_cumprod(num_train_timesteps)
        abar = torch.cat([torch.ones(1, dtype=torch.float64), table[self.timesteps[::-1]]])
        self.register_buffer("_abar", abar, persistent=False)

    def abar(self) -> Tensor:
        return self._abar

    def timestep(self, t: int) -> int:
        """The DDPM timestep of sampling step ``t`` (1..T)."""
        return self.timesteps[len(self.timesteps) - t]
