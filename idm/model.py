"""The IDM network: a pretrained diffusion sampling process as a T-step reconstruction network.

    x_T   = sqrt(abar_T) A^+ y                      (or noise)
    x_t-1 = F_t(x_t; y, A)                           one DDNM step (idm.step), t = T..1
    x_hat = x_0

With ``invertible="steps"`` or ``"both"`` the steps are wired (paper Eqs. 4-5):
``(x_t-1, h_t-1) = ((1 - v_t) F_t(x_t) + v_t h_t, x_t)`` with ``h_T = w_T x_T``
and ``x_hat = x_0 + w_0 h_0``; with ``"both"`` the U-Net's equal-width blocks
are wired too (idm.unets.wired_unet). The measurement ``y`` and the operator
travel as arguments: the model holds no per-call state and is re-entrant.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from idm.checkpoint import (CheckpointError, check_weights_fit, json_sha256, load_json, load_metadata, load_tensors,
                            save_json, save_tensors)
from idm.config import IDMConfig
from idm.precision import autocast_for, resolve_precision
from idm.step import DDPMSchedule, LearnedSchedule, ddnm_step
from idm.unets import (
    BUILT_IN_UNETS,
    SD15_UNET_CONFIG,
    WiredUNet,
    check_prior_schedule,
    describe_unet,
    load_unet_folder,
    materialize,
    prune_unet,
    read_prior_range,
    tiny_unet_config,
    unet_from_config,
    unet_source_folder,
)
from idm.wiring import WiredSequence, coupling_forward
from operators import check_measurements_for, has_exact_pinv, has_linear_pinv, image_shape_of, unchecked_values
from operators.least_squares import least_squares_solve

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: The key, in ``model.safetensors``' metadata, of the SHA-256 of the config it was saved with.
CONFIG_DIGEST_KEY = "config_sha256"
FORMAT = "idm-model"


def weights_metadata(config: dict[str, Any]) -> dict[str, str]:
    """The metadata ``model.safetensors`` is written with: its format and :func:`config_digest` of the
    ``config.json`` beside it (``config``), which :meth:`IDM.from_pretrained` checks, so that a config edited
    or left from another save is named instead of running the weights in another network."""
    return {"format": FORMAT, CONFIG_DIGEST_KEY: config_digest(config)}


def check_config_matches_weights(directory: Path, config: dict[str, Any]) -> None:
    """A :class:`CheckpointError` when ``directory``'s ``model.safetensors`` records the digest of another config
    than ``config`` (its ``config.json`` as read): edited by hand, or left by a save stopped between the two
    files. Folders saved before the record existed are not checked."""
    saved_with = load_metadata(directory / WEIGHTS_NAME).get(CONFIG_DIGEST_KEY)
    if saved_with is not None and saved_with != config_digest(config):
        raise CheckpointError(
            f"{directory / CONFIG_NAME} is not the config that {WEIGHTS_NAME} was saved with (edited by hand, or a "
            "save stopped between the two files): the weights would run in another network; save the model again"
        )


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of a model's ``config.json`` without ``idm.unet``, the record of where its prior came from (a
    name or a folder, which may move: the model does not read it), so the record can be brought up to date."""
    idm = config.get("idm") if isinstance(config, dict) else None
    if isinstance(idm, dict):
        config = {**config, "idm": {k: v for k, v in idm.items() if k != "unet"}}
    return json_sha256(config)


@dataclass
class StepTrace:
    """What one sampling step saw and produced (see :meth:`IDM.trace`); tensors ``(B, C, H, W)``."""

    t: int
    x_t: Tensor
    eps: Tensor
    x0: Tensor
    x_prev: Tensor


def _source_unet(config: IDMConfig) -> nn.Module:
    """The unpruned diffusers U-Net named by ``config.unet`` (meta device for ``sd15``). With the fixed DDPM
    schedule (``schedule="ddpm"``), a folder whose scheduler config describes another schedule is refused: its
    U-Net was trained for other noise levels (the learned schedule starts from its own values)."""
    if config.unet == "tiny":
        return unet_from_config("UNet2DModel", tiny_unet_config(1 if config.separate_channels else config.image_channels))
    if config.unet == "sd15":
        return unet_from_config("UNet2DConditionModel", SD15_UNET_CONFIG, device="meta")
    folder = unet_source_folder(Path(config.unet))
    if config.schedule == "ddpm":
        check_prior_schedule(folder)
    return load_unet_folder(folder)


def _resolve_auto(config: IDMConfig, unet: nn.Module) -> IDMConfig:
    """Fill the ``None`` (automatic) architecture fields from the U-Net's class."""
    latent_net = type(unet).__name__ == "UNet2DConditionModel"
    scales = len(unet.down_blocks)
    keep_scales = config.keep_scales if config.keep_scales is not None else (max(1, scales - 2) if latent_net else scales)
    if keep_scales > scales:
        raise ValueError(f"IDMConfig: keep_scales={keep_scales} but the U-Net has only {scales} scales")
    keep_mid = config.keep_mid if config.keep_mid is not None else keep_scales == scales
    unshuffle = config.pixel_unshuffle if config.pixel_unshuffle is not None else (2 if latent_net else 1)
    prior_range = config.prior_range
    if prior_range is None:
        recorded = read_prior_range(config.unet) if config.unet not in BUILT_IN_UNETS else None
        prior_range = "symmetric" if recorded == (-1.0, 1.0) else "unit"
    return config.replace(keep_scales=keep_scales, keep_mid=keep_mid, pixel_unshuffle=unshuffle, prior_range=prior_range)


def _refuse_operator_gradients(op: Any, y: Tensor) -> None:
    """A ``ValueError`` if ``op.A`` or ``op.A_dagger`` depends on tensors that require grad (a learned
    sampling matrix or blur kernel, as a parameter or in a closure): the memory-saving backward
    differentiates the model's own parameters and ``y`` only, so their gradients would be missing or
    wrong, silently. Probed with one ``A_dagger`` and one ``A`` of detached inputs."""
    with torch.enable_grad(), torch.autocast(y.device.type, enabled=False):
        x = op.A_dagger(y.detach())
        dependent = [name for name, out in (("A_dagger", x), ("A", op.A(x.detach()))) if out.requires_grad]
    if dependent:
        verb = "depends" if len(dependent) == 1 else "depend"
        raise ValueError(
            f"the operator's {' and '.join(dependent)} {verb} on tensors that require grad (e.g. a learned sampling "
            "matrix); the memory-saving backward (recompute=True with invertible='steps' or 'both') differentiates the "
            "model's parameters and y only, and would leave those gradients wrong: build the model with "
            "recompute=False to learn the operator with plain autograd, or detach the operator's tensors"
        )


def refuse_nonlinear_pinv(op: Any) -> None:
    """A ``ValueError`` if ``op.A_dagger`` is not a fixed linear map (:func:`operators.has_linear_pinv`): the
    memory-saving backward recomputes every injector's and step's ``A_dagger`` on inputs rebuilt by inverting
    the wiring, equal to the forward's up to rounding, and an iterative solve stopped at a tolerance (CT with
    ``pinv="cg"``) turns that rounding into gradients that are wrong by percents, silently."""
    if not has_linear_pinv(op):
        raise ValueError(
            "the operator's A_dagger is an iterative solve (e.g. ct with pinv='cg'), which the memory-saving backward "
            "(recompute=True with invertible='steps' or 'both') cannot recompute to rounding: its gradients would be "
            "wrong; use a fixed linear A_dagger (ct: pinv='fbp', the default), or build the model with recompute=False"
        )


@contextlib.contextmanager
def _foreign_operator_errors(op: Any, y: Tensor):
    """Re-raise a deepinv physics' failure on ``y`` (no shape check of its own) as a ``ValueError`` naming
    ``y``'s shape and dtype, instead of an error from deep inside torch; the toolkit's operators checked
    ``y`` already."""
    if callable(getattr(op, "check_measurement", None)):
        yield
        return
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the operator ({type(op).__name__}) failed on y of shape {tuple(y.shape)}, {y.dtype}: {first}") from err


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class IDM(nn.Module):
    """Invertible Diffusion Model: ``x_hat = model(y, op)``.

    Args:
        config: the architecture (:class:`IDMConfig`).
        unet: an unpruned diffusers U-Net to use instead of ``config.unet``
            (used by :meth:`from_pretrained`; may live on the meta device). It
            is pruned and wired in place and becomes this model's: pass a
            ``copy.deepcopy`` to build a second model from the same U-Net. A
            float16 or bfloat16 U-Net is cast to float32, as a folder is loaded.
        init_weights: give a meta-device U-Net (``sd15``, :meth:`from_pretrained`)
            a fresh random initialisation. ``False`` leaves it on the meta
            device, without storage: :meth:`load_weights` assigns real tensors
            (and parameters can be counted without allocating them).
    """

    def __init__(self, config: IDMConfig, unet: nn.Module | None = None, init_weights: bool = True):
        super().__init__()
        if unet is None:
            unet = _source_unet(config)
        elif any(p.dtype in (torch.float16, torch.bfloat16) for p in unet.parameters()):
            unet = unet.float()  # as a folder is loaded (a diffusers torch_dtype=float16 one): the wiring runs in float32
        self.unet_class, self.unet_config = describe_unet(unet)
        config = _resolve_auto(config, unet)
        self.config = config
        prune_unet(unet, keep_scales=config.keep_scales, keep_mid=config.keep_mid, keep_time=config.time_input)
        if init_weights and any(p.is_meta for p in unet.parameters()):
            materialize(unet)
        self.eps_net = WiredUNet(
            unet,
            image_channels=config.image_channels,
            steps=config.steps,
            pixel_unshuffle=config.pixel_unshuffle,
            injectors=config.injectors,
            wire_blocks=config.invertible == "both",
            injector_kernel=config.injector_kernel,
            separate_channels=config.separate_channels,
        )
        if config.schedule == "learned":
            self.schedule = LearnedSchedule(config.steps, config.alpha_init)
        else:
            self.schedule = DDPMSchedule(config.steps)
        if config.invertible != "none":
            # The steps are the outermost chain: the last step's graph is kept from the forward (idm.wiring).
            self.wiring = WiredSequence(config.steps, keep_last_graph=True)
        #: ``"fp32"`` or ``"bf16"`` (U-Net under bf16 autocast) in eval mode, set by :meth:`for_inference`;
        #: not saved. Training mode always runs as the caller's autocast says.
        self.inference_precision = "fp32"
        # one mode for every part: a U-Net loaded by diffusers' from_pretrained comes in eval mode, which would
        # switch its dropout off in training forwards until the first .train()
        self.train()

    # ---- the network -------------------------------------------------------------
    def _step(self, t: int, x_t: Tensor, op: Any, x_pinv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sampling step ``t`` (T..1): returns ``(x_{t-1}, eps, projected x0)``."""
        abar = self.schedule.abar().to(x_t.dtype)
        eps = self.eps_net(
            x_t,
            step=self.config.steps - t,
            op=op,
            x_pinv=x_pinv,
            recompute=self.config.recompute,
            timestep=self.schedule.timestep(t),
            keep_attention=self.config.keep_attention,
        )
        x_prev, x0 = ddnm_step(x_t, eps, abar[t], abar[t - 1], op, x_pinv, shift=self._projection_shift)
        return x_prev, eps, x0

    @property
    def _projection_shift(self) -> float:
        """1 when ``x_pinv`` is ``2 A^+ y - 1`` (``pinv_mapping="images"`` in the symmetric range), else 0."""
        return 1.0 if self.config.prior_range == "symmetric" and self.config.pinv_mapping == "images" else 0.0

    def _layers(self) -> list:
        return [
            (lambda x, op, x_pinv, t=t: self._step(t, x, op, x_pinv)[0])
            for t in range(self.config.steps, 0, -1)
        ]

    def initial_state(self, x_pinv: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """``x_T``: ``sqrt(abar_T) A^+ y``, or for ``init="noise"`` standard normal noise shaped like ``x_pinv``.

        The noise is ``noise`` when given (drawn by the caller, e.g. a slice of
        a global batch's draw), else drawn from ``generator``.
        """
        if self.config.init != "noise":
            if noise is not None:
                raise ValueError(f"noise is the start of init='noise' models; this one starts from {self.config.init!r}")
            return self.schedule.abar()[-1].to(x_pinv.dtype).sqrt() * x_pinv
        if noise is None:
            if generator is not None and not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
                                 f"got {type(generator).__name__}")  # fmt: skip
            return torch.randn(x_pinv.shape, generator=generator, device=x_pinv.device, dtype=x_pinv.dtype)
        if not isinstance(noise, Tensor):
            raise ValueError(f"noise must be a tensor of the shape of A^+ y, {tuple(x_pinv.shape)}; got {type(noise).__name__}")
        if noise.shape != x_pinv.shape:
            raise ValueError(f"noise must have the shape of A^+ y, {tuple(x_pinv.shape)}; got {tuple(noise.shape)}")
        if not noise.is_floating_point() or not bool(torch.isfinite(noise).all()):
            raise ValueError(f"noise must be finite floating-point values, got {noise.dtype}"
                             + ("" if not noise.is_floating_point() else " with NaN or inf"))  # fmt: skip
        return noise.to(device=x_pinv.device, dtype=x_pinv.dtype)

    def prior_range_pinv(self, y: Tensor, op: Any) -> Tensor:
        """``A^+ y`` of ``[0, 1]``-image measurements ``y``, in the prior's range (``IDMConfig.pinv_mapping``)."""
        if self.config.prior_range == "unit":
            return self.pseudo_inverse(y, op)
        if self.config.pinv_mapping == "images":
            return 2 * self.pseudo_inverse(y, op) - 1
        return self.pseudo_inverse(self.to_prior_range(y, op), op)

    def pseudo_inverse(self, y: Tensor, op: Any) -> Tensor:
        """``A^+ y`` ``(B, C, H, W)`` in ``y``'s dtype, computed outside autocast, with the channel count and
        dtype checked."""
        with torch.autocast(y.device.type, enabled=False), _foreign_operator_errors(op, y):
            x_pinv = op.A_dagger(y)
        if x_pinv.dtype != y.dtype:  # e.g. complex (an inverse FFT without .real), or computed in float64
            raise ValueError(f"the operator's A_dagger returned {x_pinv.dtype} images from {y.dtype} measurements; "
                             f"IDM needs real images in the measurements' dtype")  # fmt: skip
        if x_pinv.dim() == 4 and x_pinv.shape[0] != y.shape[0]:  # e.g. a deepinv physics of 2 masks given 1 y
            raise ValueError(f"the operator's A_dagger made {x_pinv.shape[0]} images of {y.shape[0]} measurement(s): "
                             "its batch (of masks or kernels) does not match y's")  # fmt: skip
        if x_pinv.dim() != 4 or x_pinv.shape[1] != self.config.image_channels:
            raise ValueError(
                f"the operator maps y to images of shape {tuple(x_pinv.shape)}, but this IDM reconstructs "
                f"(B, {self.config.image_channels}, H, W) images"
            )
        return x_pinv

    def forward(self, y: Tensor, op: Any, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Reconstruct images from measurements.

        Args:
            y: measurements, in the layout of ``op`` (e.g. ``(B, C, n_blocks, q)`` for block CS);
                floating-point measurements of another dtype (float64 for a float32 model, bf16)
                are cast to the model's dtype first.
            op: any deepinv ``LinearPhysics`` with ``A``, ``A_adjoint``, ``A_dagger``.
            generator: random source for ``init="noise"``.
            noise: ``x_T`` for ``init="noise"`` instead (shaped like ``A^+ y``, ``(B, C, H, W)``).

        Returns:
            ``(B, C, H, W)`` reconstruction in the model's dtype, in the value range
            of the training images (``[0, 1]`` for the toolkit's tasks; not clamped).
        """
        y = self._checked_measurements(y, op)
        with unchecked_values():  # y is checked; the many operator calls below skip the host sync of theirs
            return self._forward(y, op, generator, noise)

    def _checked_measurements(self, y: Tensor, op: Any) -> Tensor:
        """``y`` checked by ``op`` (shape, NaN/inf) and cast to the model's dtype."""
        if not torch.is_tensor(y):
            raise TypeError(f"y must be a torch.Tensor of measurements, got {type(y).__name__}")
        missing = [name for name in ("A", "A_adjoint", "A_dagger") if not callable(getattr(op, name, None))]
        if missing:
            raise TypeError(
                f"op must be a linear operator with A, A_adjoint and A_dagger (an operators.Operator or a deepinv "
                f"LinearPhysics); {type(op).__name__} has no {', '.join(missing)}"
            )
        if y.is_complex():  # the toolkit's operators take complex data as real channels (MRI: 2 channels)
            raise ValueError(f"y is {y.dtype}: IDM takes real measurements, with a complex value as two real channels")
        check_measurements_for(op, y)
        first = next(self.parameters())
        if first.is_meta:
            raise RuntimeError("this IDM was built with init_weights=False and has no weights yet (its parameters are on "
                               "the meta device): load them with load_weights, or build it with init_weights=True")  # fmt: skip
        return y.to(first.dtype) if y.is_floating_point() and y.dtype != first.dtype else y

    def _forward(self, y: Tensor, op: Any, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
        x_pinv = self.prior_range_pinv(y, op)
        x = self.initial_state(x_pinv, generator, noise)
        layers = self._layers()
        with self._inference_autocast(y.device.type):
            if self.config.invertible == "none":
                for k, layer in enumerate(layers):
                    # the last step is not checkpointed: its backward would rebuild its graph at once
                    if self.config.recompute and torch.is_grad_enabled() and k < len(layers) - 1:
                        x = checkpoint(layer, x, op, x_pinv, use_reentrant=False)
                    else:
                        x = layer(x, op, x_pinv)
            else:
                # only the memory-saving backward needs them (a list of every parameter, per call, is host time)
                need_params = self.config.recompute and torch.is_grad_enabled()
                if need_params:
                    if self.training:
                        self.check_deterministic()
                    _refuse_operator_gradients(op, y)
                params = [p for name, p in self.named_parameters() if not name.startswith("wiring.")] if need_params else []
                if y.requires_grad or any(p.requires_grad for p in params):  # a backward that will recompute
                    refuse_nonlinear_pinv(op)
                x = self.wiring(x, layers, context=(op, x_pinv), params=params, recompute=self.config.recompute)
        return self.output(x, y, op)

    def check_deterministic(self) -> None:
        """A ``ValueError`` if this model would train with the memory-saving backward (wired, ``recompute``)
        and a dropout in training mode: the backward recomputes every layer and inverts the wiring with the
        recomputed values, so a dropout mask drawn anew there would give wrong gradients, silently.
        Checked by every training forward; ``idm train`` checks it before it writes its run folder."""
        if self.config.invertible == "none" or not self.config.recompute:
            return
        active = [name for name, m in self.named_modules() if isinstance(m, _DROPOUTS) and m.p > 0 and m.training]
        if active:
            raise ValueError(
                f"the memory-saving backward (invertible={self.config.invertible!r}, recompute=True) recomputes the "
                f"U-Net and needs it deterministic, but it has dropout in training mode ({', '.join(active[:3])}"
                f"{', ...' if len(active) > 3 else ''}): set the U-Net's dropout to 0, or train with recompute=False"
            )

    def output(self, x: Tensor, y: Tensor, op: Any) -> Tensor:
        """The wired network's output in the prior's range -> the reconstruction in ``[0, 1]``
        (projected onto the measurements when ``IDMConfig.final_projection``)."""
        x = self.from_prior_range(x)
        return self.project_onto_measurements(x, y, op) if self.config.final_projection else x

    def project_onto_measurements(self, x: Tensor, y: Tensor, op: Any) -> Tensor:
        """``x + A^+ (y - A x)`` for ``(B, C, H, W)`` images ``x`` in ``[0, 1]`` (``IDMConfig.final_projection``).

        ``A^+`` is ``op.A_dagger`` when it is a pseudo-inverse
        (``operators.has_exact_pinv``: the operator's ``exact_pinv``, true for a
        deepinv physics, whose iterative ``A_dagger`` fits as tightly as its
        ``tol`` says), else ``IDMConfig.projection_cg_iters`` conjugate-gradient
        steps of least squares (an approximate ``A_dagger`` such as CT's
        filtered back-projection would not project). One ``A`` and one ``A^+`` of the
        residual; runs outside autocast, in the real dtype of ``y``;
        differentiable either way.
        """
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(y.real.dtype)
            residual = y - op.A(x)
            if has_exact_pinv(op):
                return x + op.A_dagger(residual)
            return x + least_squares_solve(op, residual, max_iter=self.config.projection_cg_iters)

    def _inference_autocast(self, device_type: str):
        """bf16 autocast when :meth:`for_inference` asked for it and the model is in eval mode; else a no-op."""
        return autocast_for(device_type, "fp32" if self.training else self.inference_precision)

    def for_inference(self, channels_last: bool | None = None, precision: str = "fp32") -> "IDM":
        """Eval mode, no parameter gradients, and (by default on the CPU) channels-last weights; returns ``self``.

        Channels-last weights make the convolutions pick the NHWC kernels:
        13 % faster inference on the project's 2-core CPU
        (``python -m benchmarks.speed --levers base channels_last``). The
        function computed is the same; call it after moving the model to its
        device. Training code should not call it.

        ``precision="bf16"`` runs the U-Net under bfloat16 autocast from now
        on, the wired states and the operator in float32
        (:mod:`idm.precision`); ``"fp32"`` (the default) switches it back;
        ``"auto"`` picks bf16 where the parameters' device has native bfloat16.
        """
        device = next(self.parameters()).device
        self.inference_precision = resolve_precision(precision, device)
        self.eval().requires_grad_(False)
        if channels_last is None:
            channels_last = all(p.device.type == "cpu" for p in self.parameters())
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def to_prior_range(self, y: Tensor, op: Any) -> Tensor:
        """Measurements of ``[0, 1]`` images -> measurements of the same images in the prior's range.

        ``"symmetric"``: ``A(2 x - 1) = 2 y - A 1`` (exact, ``A`` is linear).
        """
        if self.config.prior_range == "unit":
            return y
        with torch.autocast(y.device.type, enabled=False):
            # a whole batch of ones: a physics may hold one mask or kernel per image
            ones = torch.ones((y.shape[0], *self._image_shape(y, op)), dtype=y.dtype, device=y.device)
            return 2 * y - op.A(ones)

    def from_prior_range(self, x: Tensor) -> Tensor:
        """Images in the prior's range -> the task's ``[0, 1]`` range."""
        return x if self.config.prior_range == "unit" else (x + 1) / 2

    def _image_shape(self, y: Tensor, op: Any) -> tuple[int, ...]:
        with torch.no_grad(), _foreign_operator_errors(op, y):  # A_adjoint runs for a physics without image_shape
            return image_shape_of(op, y)

    @torch.no_grad()
    def trace(self, y: Tensor, op: Any, generator: torch.Generator | None = None) -> tuple[Tensor, list[StepTrace]]:
        """Run the network step by step and record every step; returns ``(x_hat, traces)``.

        Gives the same ``x_hat`` as :meth:`forward`; for inspection and figures.
        The traces are in the prior's range (see ``IDMConfig.prior_range``).
        """
        y = self._checked_measurements(y, op)
        with unchecked_values():
            return self._trace(y, op, generator)

    def _trace(self, y: Tensor, op: Any, generator: torch.Generator | None) -> tuple[Tensor, list[StepTrace]]:
        x_pinv = self.prior_range_pinv(y, op)
        x1 = self.initial_state(x_pinv, generator)
        x2 = self.wiring.in_scale * x1 if self.config.invertible != "none" else None
        traces = []
        for k, t in enumerate(range(self.config.steps, 0, -1)):
            with self._inference_autocast(y.device.type):
                x_prev, eps, x0 = self._step(t, x1, op, x_pinv)
            traces.append(StepTrace(t, x1, eps, x0, x_prev))
            if x2 is None:
                x1 = x_prev
            else:
                x1, x2 = coupling_forward(x_prev, x1, x2, self.wiring.v[k])
        x_hat = x1 if x2 is None else x1 + self.wiring.out_scale * x2
        return self.output(x_hat, y, op), traces

    # ---- persistence ---------------------------------------------------------------
    def export_config(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_config_dict` rebuilds the architecture."""
        return {
            "format": FORMAT,
            "idm": self.config.to_dict(),
            "unet_class": self.unet_class,
            "unet_config": self.unet_config,
        }

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], init_weights: bool = True) -> "IDM":
        """Rebuild the architecture from :meth:`export_config` output (random or empty weights)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"not an IDM model config (expected format {FORMAT!r})")
        expected = {"idm": dict, "unet_class": str, "unet_config": dict}
        wrong = [f"{key!r} ({kind.__name__})" for key, kind in expected.items() if not isinstance(data.get(key), kind)]
        if wrong:
            raise CheckpointError(f"IDM model config lacks or mistypes {', '.join(wrong)}")
        try:
            config = IDMConfig.from_dict(data["idm"])
            unet = unet_from_config(data["unet_class"], data["unet_config"], device="meta")
            return cls(config, unet=unet, init_weights=init_weights)
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError) as err:  # a damaged value: diffusers' or our own complaint about it
            raise CheckpointError(f"IDM model config describes a model that cannot be built: {type(err).__name__}: {err}") from None

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``, each file atomically.

        The two are replaced one after the other; to replace a whole model
        folder at once, write it elsewhere and swap folders (as ``idm export``
        and the training checkpoints do).
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"cannot save the model into {str(directory)!r}: it is a file, not a folder")
        blocking = next((p for p in directory.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise CheckpointError(f"cannot save the model into {str(directory)!r}: {str(blocking)!r} on its path is a file")
        state = self.state_dict()
        if any(t.is_meta for t in state.values()):  # built with init_weights=False and never given its weights
            raise CheckpointError("cannot save a model without weights (built with init_weights=False; "
                                  "load_weights gives it its weights)")  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        config = self.export_config()
        save_tensors(state, directory / WEIGHTS_NAME, metadata=weights_metadata(config))
        save_json(config, directory / CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "IDM":
        """Load a model written by :meth:`save_pretrained` (or a shipped model, by its name: ``"cs-10"``); clear
        errors for anything else. The model comes in training mode, as built: :meth:`for_inference` prepares it
        for reconstruction (eval mode, no gradients). Its weights are float32 whatever the file holds (a float16
        export is widened; float64 weights, from a ``.double()`` model, are rounded: convert the loaded model
        back with ``.double()`` where that matters). :func:`idm.train.load_trained` also reads the task and
        operator a training checkpoint recorded, and checks them."""
        from idm.shipped import model_path

        directory = Path(model_path(str(directory)))
        if directory.is_file():
            raise CheckpointError(f"{str(directory)!r} is a file; give the IDM model folder that holds it "
                                  f"({CONFIG_NAME} and {WEIGHTS_NAME})")  # fmt: skip
        if not directory.is_dir():
            raise CheckpointError(f"IDM model folder {str(directory)!r} does not exist, nor is it the name of a shipped "
                                  "model (`idm info` lists them)")  # fmt: skip
        config = load_json(directory / CONFIG_NAME, "IDM config")
        try:
            model = cls.from_config_dict(config, init_weights=False)
        except CheckpointError as err:
            raise CheckpointError(f"{directory / CONFIG_NAME}: {err}") from None
        check_config_matches_weights(directory, config)
        model.load_weights(load_tensors(directory / WEIGHTS_NAME), source=directory / WEIGHTS_NAME)
        return model.to(device)

    def load_weights(self, state: dict[str, Tensor], source: str | Path = "state dict") -> None:
        """``load_state_dict`` with an error that says which keys or shapes do not match, or which weights are
        not finite (a damaged file: a model with NaN weights reconstructs nothing).

        The values are copied: into the existing tensors (keeping their device,
        dtype and memory format), or, for a model built without storage
        (``init_weights=False``, on the meta device), as new tensors in this
        model's dtypes. Either way ``state`` and this model share no storage.
        """
        own = self.state_dict()
        check_weights_fit(own, state, source, "this IDM")
        if any(t.is_meta for t in own.values()):
            self.load_state_dict({k: v.to(own[k].dtype, copy=True) for k, v in state.items()}, assign=True)
        else:
            self.load_state_dict(state)
