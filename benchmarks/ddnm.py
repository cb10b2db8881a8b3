"""``ddnm``: Denoising Diffusion Null-space Model (Wang et al., ICLR 2023), as its authors run it.

From noise, ``steps`` (100) DDIM steps of the prior on DDNM's uniform timesteps
(``idm.step.ddnm_timesteps``: 990, 980, ..., 0 for 100 steps) of the 1000-step
linear schedule (``idm.step.ddpm_alphas_cumprod``), each one
:func:`idm.step.ddnm_step` -- the very step code of the IDM core::

    e      = unet(x_t, t)                                   (1 NFE)
    x0     = (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t)
    x0     = x0 - A^+(A x0 - y)                             (range-null-space projection)
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) (eta z + sqrt(1 - eta^2) e)

with ``eta = 0.85`` and ``z ~ N(0, I)`` from the caller's generator, in the
prior's space (:class:`benchmarks.prior.PriorSpace`: ``y_model = 2y - A(1)``,
result mapped back with ``(x + 1) / 2``). The last step has ``abar_prev = 1``
and returns the projected ``x0``, so ``A x_hat = y`` for operators with an
exact pseudo-inverse. NFE per image = ``steps``.

With ``eta = 0`` this is exactly ``idm.IDM(IDMConfig(invertible="none",
injectors=False, schedule="ddpm", time_input=True, init="noise",
steps=T))`` with the same U-Net, fed ``y_model`` (tested).

Choices, checked against the authors' code (wyhuai/DDNM):

* **No clipping of x0 by default.** The DDIM-based samplers the paper's numbers
  come from (``functions/svd_ddnm.py::ddnm_diffusion`` and
  ``simplified_ddnm_plus``) never clip ``x0``; only the separate
  guided-diffusion ``hq_demo`` (a DDPM sampler) clamps ``x0`` to [-1, 1]
  before the projection. ``clip_x0=True`` clamps the unprojected ``x0`` and
  passes the noise estimate re-derived from it to the step (diffusers' DDIM
  ``use_clipped_model_output`` convention), so it stays on ``ddnm_step``.
* **Output not clamped by default.** The authors clamp only when writing /
  scoring images (``inverse_data_transform``); here scoring is the harness's
  job (``idm.metrics.cs_protocol_metrics`` clamps), which treats every method
  and IDM alike and leaves MRI's signed real/imaginary channels intact.
  ``clamp_output=True`` clamps to [0, 1].
* **Approximate pseudo-inverses (CT)**: DDNM's projection needs a true
  ``A^+``. CT's filtered back-projection is not one: at 18 views
  ``||I - FBP A||`` is about 5, every step amplifies part of the prior's
  error, and DDNM diverges (3.7 dB on the clinical slices). So with
  ``pinv="auto"`` (default) an operator whose ``A_dagger`` is not exact
  (:func:`operators.has_exact_pinv`) gets
  a least-squares ``A^+``: ``lsq_iters`` conjugate-gradient steps on the
  normal equations (:class:`operators.least_squares.LeastSquaresInverse`,
  the solver of CT's ``pinv="cg"``). ``pinv="operator"`` uses ``A_dagger`` as it is,
  ``"least-squares"`` always solves.
* Noise-free measurements (DDNM, not DDNM+): no ``sigma_y`` weighting.
* No time-travel (the authors' default ``travel_length=1, travel_repeat=1``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks.prior import DiffusionPrior, default_generator, image_shape, randn
from idm.step import ddnm_step, ddnm_timesteps
from operators import has_exact_pinv
from operators.least_squares import LeastSquaresInverse


#: How :class:`DDNM` gets the ``A^+`` of its projection.
PINV_CHOICES = ("auto", "operator", "least-squares")


class DDNM:
    """DDNM sampler around a :class:`~benchmarks.prior.DiffusionPrior`.

    Args:
        prior: the diffusion prior.
        steps: sampling steps (100 as the authors; NFE per image).
        eta: DDNM's stochasticity (0.85 as the authors; 0 = deterministic DDIM).
        clip_x0: clamp ``x0`` to [-1, 1] before the projection (off, see module docstring).
        clamp_output: clamp the result to [0, 1] (off, see module docstring).
        pinv: ``"auto"``, ``"operator"`` or ``"least-squares"`` (see module docstring).
        lsq_iters: conjugate-gradient steps of the least-squares ``A^+``.
        progress: show a tqdm bar over the steps (``leave=False``).
    """

    name = "ddnm"

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 100,
        eta: float = 0.85,
        clip_x0: bool = False,
        clamp_output: bool = False,
        pinv: str = "auto",
        lsq_iters: int = 20,
        progress: bool = True,
    ):
        if prior is None:
            raise ValueError("ddnm needs a diffusion prior (benchmarks.prior.load_prior)")
        steps = int(steps)
        if not 1 <= steps <= prior.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {prior.num_train_timesteps}], got {steps}")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta!r}")
        if pinv not in PINV_CHOICES:
            raise ValueError(f"pinv must be one of {PINV_CHOICES}, got {pinv!r}")
        if int(lsq_iters) < 1:
            raise ValueError(f"lsq_iters must be a positive integer, got {lsq_iters!r}")
        self.prior = prior
        self.steps = steps
        self.pinv = pinv
        self.lsq_iters = int(lsq_iters)
        self.eta = float(eta)
        self.clip_x0 = bool(clip_x0)
        self.clamp_output = bool(clamp_output)
        self.progress = bool(progress)
        self.timesteps = ddnm_timesteps(steps, prior.num_train_timesteps)  # first sampled first

    @property
    def nfe(self) -> int:
        """U-Net evaluations per image: one per step."""
        return self.steps

    def projection_operator(self, op: Any) -> Any:
        """``op``, or ``op`` with a least-squares ``A_dagger`` (see module docstring)."""
        solve = self.pinv == "least-squares" or (self.pinv == "auto" and not has_exact_pinv(op))
        if not solve:
            return op
        return LeastSquaresInverse(op, max_iter=self.lsq_iters)

    @torch.no_grad()
    def __call__(self, y: Tensor, op: Any, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruct ``(B, C, H, W)`` images in the image space from measurements ``y``.

        ``generator`` is the only source of randomness (``x_T`` and, with
        ``eta > 0``, one ``z`` per step); ``None`` means a fresh generator seeded 0.
        """
        prior, space = self.prior, self.prior.space
        shape = image_shape(y, op)
        prior.check_images(shape)
        generator = default_generator(generator, y)
        y_model = space.measurement_to_model(y, op)
        op = self.projection_operator(op)
        x_pinv = op.A_dagger(y_model)
        x = randn(shape, generator, x_pinv)
        nexts = self.timesteps[1:] + [-1]
        for t, t_prev in tqdm(
            list(zip(self.timesteps, nexts)), desc="ddnm", leave=False, disable=not self.progress
        ):
            abar_t, abar_prev = prior.abar(t, x), prior.abar(t_prev, x)
            eps = prior.eps(x, t)
            if self.clip_x0:
                x0 = ((x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()).clamp(-1.0, 1.0)
                eps = (x - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
            noise = randn(shape, generator, x) if self.eta > 0 else None
            x, _ = ddnm_step(x, eps, abar_t, abar_prev, op, x_pinv, eta=self.eta, noise=noise)
        x_hat = space.to_image(x)
        return x_hat.clamp(0.0, 1.0) if self.clamp_output else x_hat

    def __repr__(self) -> str:
        return (
            f"DDNM(steps={self.steps}, eta={self.eta}, clip_x0={self.clip_x0}, "
            f"clamp_output={self.clamp_output}, pinv={self.pinv!r}, lsq_iters={self.lsq_iters})"
        )
