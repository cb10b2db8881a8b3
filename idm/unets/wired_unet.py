"""A (pruned) diffusers U-Net run as IDM's noise estimator, with second-level wiring and injectors.

The adapter walks the blocks of a diffusers ``UNet2DModel`` or
``UNet2DConditionModel`` and runs its own forward:

* the image ``(B, C_img, H, W)`` is pixel-unshuffled by ``s`` (2 for SD's
  4-channel latent U-Net, 1 for pixel-space priors) and padded to a multiple
  of what the downsamplers need; ``conv_in``/``conv_out`` are widened by
  tiling when ``C_img * s^2`` exceeds the U-Net's channels (RGB, MRI), or,
  with ``separate_channels``, each image channel runs as its own one-channel
  image (the batch becomes ``B * C_img``; the injectors' operator still sees
  whole images);
* every "layer" of a block (a resnet and, if present, its attention) forms a
  **group**: a channel-changing resnet runs as is, the equal-width modules
  that follow it (the resnet itself if it keeps the width, the attention),
  each followed by an :class:`~idm.injector.Injector`, are wired into a
  :class:`~idm.wiring.WiredSequence` with its own ``v`` per module and
  in/out scales. Groups end where a skip feature is emitted (a skip must be
  stored anyway), so only channel-changing resnets, samplers and skip
  features are kept for backward;
* injectors have separate weights per sampling step; the U-Net is shared.

``wire_blocks=False`` runs the same modules (injectors included) as a plain
chain, without wiring scalars.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import Tensor, nn
from torch.nn import functional as F

from idm.injector import Injector
from idm.precision import full_precision
from idm.unets.conv_outputs_only import conv_outputs_only
from idm.unets.upsample import upsample
from idm.wiring import WiredSequence


@dataclass(frozen=True)
class GroupPlan:
    """One group of a U-Net block: where it is and what it contains.

    ``where`` is ``("down_blocks", b, j)``, ``("mid_block", 0, j)`` or
    ``("up_blocks", b, j)``; ``pre`` names a channel-changing module run before
    the wired part; ``members`` are ``(attribute, index)`` pairs of the block,
    in order; ``channels`` and ``scale`` (image size / feature size) size the
    injectors.
    """

    where: tuple[str, int, int]
    pre: tuple[str, int] | None
    members: tuple[tuple[str, int], ...]
    channels: int
    scale: int

    @property
    def key(self) -> str:
        return f"{self.where[0]}_{self.where[1]}_{self.where[2]}"


def _tile_conv(conv: nn.Conv2d, in_factor: int, out_factor: int) -> nn.Conv2d:
    """A copy of ``conv`` whose input/output channels are tiled ``in_factor``/``out_factor`` times.

    Input tiling divides the weights by the factor, so that an input that
    repeats its channels gives the original output.
    """
    new = nn.Conv2d(
        conv.in_channels * in_factor,
        conv.out_channels * out_factor,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if conv.weight.device.type != "meta":
        with torch.no_grad():
            new.weight.copy_(conv.weight.repeat(out_factor, in_factor, 1, 1) / in_factor)
            if conv.bias is not None:
                new.bias.copy_(conv.bias.repeat(out_factor))
    return new


class WiredUNet(nn.Module):
    """Noise estimator ``eps(x_t)`` for IDM built around a pruned diffusers U-Net.

    Args:
        unet: a (pruned) diffusers U-Net; registered as ``self.unet``.
        image_channels: ``C_img``.
        steps: number of sampling steps ``T`` (injector sets).
        pixel_unshuffle: ``s``.
        injectors: add injectors after every wired module.
        wire_blocks: wire the groups (second-level invertibility).
        injector_kernel: kernel size of the injectors' convolutions.
        separate_channels: run the U-Net and injectors on each image channel
            as a one-channel image (``IDMConfig.separate_channels``).
    """

    def __init__(
        self,
        unet: nn.Module,
        image_channels: int,
        steps: int,
        pixel_unshuffle: int,
        injectors: bool = True,
        wire_blocks: bool = True,
        injector_kernel: int = 1,
        separate_channels: bool = False,
    ):
        super().__init__()
        self.image_channels = image_channels
        self.separate_channels = separate_channels
        #: image channels of one U-Net input item: 1 when the channels run separately
        self.item_channels = 1 if separate_channels else image_channels
        self.unshuffle = int(pixel_unshuffle)
        self.keep_time = getattr(unet, "time_embedding", None) is not None
        self.unet = unet
        self.wire_blocks = wire_blocks
        # nearest-upsample + 3x3 conv computed at low resolution (idm.unets.upsample); False runs diffusers' own
        self.fold_upsamplers = True
        # with wired groups and recompute, the layers outside the groups keep only their input and their
        # convolutions' outputs for backward (idm.unets.conv_outputs_only); False keeps everything, for comparison
        self.lean_unwired = True
        self.use_injectors = injectors
        self._adapt_channels()
        self._check_supported()
        self.plans = self._plan_groups()
        self.num_downsamplers = sum(block.downsamplers is not None for block in unet.down_blocks)
        counts = [self._injector_count(p) for p in self.plans]
        self._injector_offsets = [sum(counts[:i]) for i in range(len(counts))]
        if wire_blocks:
            self.wirings = nn.ModuleDict(
                {p.key: WiredSequence(self._layer_count(p)) for p in self.plans if self._layer_count(p) > 0}
            )
        if injectors:
            self.injectors = nn.ModuleList(
                nn.ModuleList(
                    self._injector(p, injector_kernel) for p in self.plans for _ in range(self._injector_count(p))
                )
                for _ in range(steps)
            )

    # ---- construction ----------------------------------------------------------
    def _adapt_channels(self) -> None:
        need = self.item_channels * self.unshuffle**2
        have_in, have_out = self.unet.conv_in.in_channels, self.unet.conv_out.out_channels
        if need == have_in and need == have_out:
            return
        if (need % have_in or need % have_out) and self.separate_channels:
            raise ValueError(
                f"separate_channels feeds the U-Net one image channel at a time ({need} channel(s) after "
                f"pixel-unshuffle by {self.unshuffle}), but it has {have_in} input / {have_out} output channels: "
                "a U-Net of several input channels needs separate_channels=False (idm train --no-separate-channels)"
            )
        if need % have_in or need % have_out:
            raise ValueError(
                f"an image of {self.image_channels} channel(s), pixel-unshuffled by {self.unshuffle}, gives {need} "
                f"channels, which the U-Net's {have_in} input / {have_out} output channels cannot be tiled to"
            )
        self.unet.conv_in = _tile_conv(self.unet.conv_in, need // have_in, 1)
        self.unet.conv_out = _tile_conv(self.unet.conv_out, 1, need // have_out)

    def _check_supported(self) -> None:
        for name in ("down_blocks", "up_blocks"):
            for block in getattr(self.unet, name):
                kind = type(block).__name__
                if kind not in {
                    "DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D",
                    "UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D",
                }:  # fmt: skip
                    raise ValueError(f"U-Net block type {kind} is not supported by the IDM adapter")
        mid = self.unet.mid_block
        if mid is not None and type(mid).__name__ not in {"UNetMidBlock2D", "UNetMidBlock2DCrossAttn"}:
            raise ValueError(f"mid block type {type(mid).__name__} is not supported by the IDM adapter "
                             "(prune it: IDMConfig.keep_mid=False)")  # fmt: skip
        for module in self.unet.modules():
            if module is self.unet or isinstance(module, Transformer2DModel):  # (the U-Net's own attribute of that
                continue  # name is its config's, which diffusers warns about reading so; its blocks say it themselves)
            if type(module).__name__ == "DualTransformer2DModel":
                raise ValueError("U-Nets with dual cross-attention (DualTransformer2DModel) are not supported by the IDM adapter")
            if getattr(module, "only_cross_attention", False) is True:  # its self-attention reads the text states
                raise ValueError("U-Nets with only_cross_attention=True are not supported by the IDM adapter: their "
                                 "attention takes its keys and values from the text embedding, which IDM does not have")  # fmt: skip
        config = getattr(self.unet, "config", {})
        if self.keep_time and (getattr(self.unet, "class_embedding", None) is not None
                               or getattr(self.unet, "add_embedding", None) is not None):  # fmt: skip
            raise ValueError("class- or text-conditioned time embeddings (class_embed_type, num_class_embeds, "
                             "addition_embed_type) are not supported with the time input kept: IDM passes no labels")  # fmt: skip
        if config.get("center_input_sample", False):  # diffusers maps the sample to 2x - 1 first; this walk does not
            raise ValueError("U-Nets with center_input_sample=True are not supported by the IDM adapter")
        if self.keep_time and config.get("time_embedding_type", "positional") == "fourier":
            raise ValueError("U-Nets with a Fourier time embedding are not supported with the time input kept")
        if not self.keep_time:
            for module in self.unet.modules():
                if getattr(module, "time_embedding_norm", "default") != "default":
                    raise ValueError("resnets with scale-shift time conditioning need the time input (time_input=True)")
        bottom = self.unet.down_blocks[-1].resnets[-1].out_channels  # the bottleneck's width, also its skip's
        from_below = self.unet.up_blocks[0].resnets[0].in_channels - bottom
        if from_below % bottom:  # pruned scales: the bottleneck is repeated to the width the kept up blocks expect
            raise ValueError(
                f"the first kept up block expects {from_below} channels from below, which the {bottom}-channel "
                "bottleneck cannot be repeated to; keep another number of scales (IDMConfig.keep_scales)"
            )

    def _resample(self, sampler: nn.Module, h: Tensor, temb: Tensor | None) -> Tensor:
        """A block's down- or upsampler: a resampling resnet (diffusers' ``*sample_type="resnet"``) takes the
        time embedding (``None`` once pruned); an ``Upsample2D`` runs at low resolution (:mod:`idm.unets.upsample`)."""
        if isinstance(sampler, ResnetBlock2D):
            return sampler(h, temb)
        return upsample(sampler, h) if self.fold_upsamplers else sampler(h)

    def _plan_groups(self) -> list[GroupPlan]:
        plans: list[GroupPlan] = []
        level = 0
        for b, block in enumerate(self.unet.down_blocks):
            plans += self._block_plans(("down_blocks", b), block, level)
            if block.downsamplers is not None:
                level += 1
        if self.unet.mid_block is not None:
            mid = self.unet.mid_block
            members: list[tuple[str, int]] = [("resnets", 0)]
            for j, attn in enumerate(mid.attentions):
                members += ([("attentions", j)] if attn is not None else []) + [("resnets", j + 1)]
            channels = mid.resnets[0].out_channels
            plans.append(GroupPlan(("mid_block", 0, 0), None, tuple(members), channels, self.unshuffle * 2**level))
        for b, block in enumerate(self.unet.up_blocks):
            plans += self._block_plans(("up_blocks", b), block, level)
            if block.upsamplers is not None:
                level -= 1
        return plans

    def _block_plans(self, where: tuple[str, int], block: nn.Module, level: int) -> list[GroupPlan]:
        plans = []
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            equal_width = resnet.in_channels == resnet.out_channels
            members = ([("resnets", j)] if equal_width else []) + ([("attentions", j)] if attentions is not None else [])
            plans.append(
                GroupPlan(
                    (where[0], where[1], j),
                    None if equal_width else ("resnets", j),
                    tuple(members),
                    resnet.out_channels,
                    self.unshuffle * 2**level,
                )
            )
        return plans

    def _injector(self, plan: GroupPlan, kernel_size: int) -> Injector:
        """An injector after a module of ``plan``'s group; a ``ValueError`` naming the group where its width does
        not fit the injector's pixel shuffle."""
        try:
            return Injector(plan.channels, plan.scale, self.item_channels, kernel_size)
        except ValueError as err:
            raise ValueError(
                f"U-Net group {plan.key}: {err} (the injector pixel-shuffles the features back to the image's size); "
                f"give that scale a width divisible by {plan.scale**2}, keep fewer scales (IDMConfig.keep_scales), "
                "or build without injectors (IDMConfig.injectors=False)"
            ) from None

    def describe(self) -> str:
        """What was wired, one line per group of a U-Net block: where it is, its modules (a channel-changing
        resnet run before the group first, in brackets), its width and scale (image size / feature size), how
        many layers its wired chain links (``chain``: its modules and injectors; 0 where the blocks are not
        wired, ``invertible`` other than ``"both"``) and how many injectors each step has there. For reading:
        ``print(model.eps_net.describe())``."""
        lines = [f"{'group':<16} {'modules':<44} {'channels':>8} {'scale':>5} {'chain':>5} {'injectors':>9}"]
        for plan in self.plans:
            modules = ([f"({plan.pre[0]}[{plan.pre[1]}])"] if plan.pre else []) + [f"{a}[{i}]" for a, i in plan.members]
            wired = self._layer_count(plan) if getattr(self, "wirings", None) is not None and plan.key in self.wirings else 0
            lines.append(f"{plan.key:<16} {' '.join(modules) or '-':<44} {plan.channels:>8} {plan.scale:>5} "
                         f"{wired:>5} {self._injector_count(plan):>9}")  # fmt: skip
        return "\n".join(lines)

    def _injector_count(self, plan: GroupPlan) -> int:
        """One injector after the channel-changing resnet (if any) and one after every member."""
        return (plan.pre is not None) + len(plan.members) if self.use_injectors else 0

    def _layer_count(self, plan: GroupPlan) -> int:
        return len(plan.members) + self._injector_count(plan)

    # ---- forward -----------------------------------------------------------------
    def _block(self, where: tuple[str, int, int]) -> nn.Module:
        container = getattr(self.unet, where[0])
        return container if where[0] == "mid_block" else container[where[1]]

    @staticmethod
    def _module_fn(module: nn.Module):
        if isinstance(module, Transformer2DModel):
            return lambda x, op, x_pinv, temb: module(x, encoder_hidden_states=None, return_dict=False)[0]
        if hasattr(module, "time_emb_proj"):  # a resnet
            return lambda x, op, x_pinv, temb: module(x, temb)
        return lambda x, op, x_pinv, temb: module(x)

    def group_layers(self, index: int, step: int) -> tuple[list, list[nn.Module]]:
        """The wired layers of group ``index`` at sampling step ``step`` (after its ``pre`` module).

        Returns ``(layers, modules)``: callables ``layer(x, op, x_pinv, temb)``
        and the modules whose parameters they use.
        """
        plan = self.plans[index]
        block = self._block(plan.where)
        injectors = iter(self.injectors[step][self._injector_offsets[index] :] if self.use_injectors else ())
        layers, modules = [], []

        def add_injector() -> None:
            if self.use_injectors:
                injector = next(injectors)
                layers.append(lambda x, op, x_pinv, temb, inj=injector: inj(x, op, x_pinv))
                modules.append(injector)

        if plan.pre is not None:
            add_injector()
        for attr, j in plan.members:
            module = getattr(block, attr)[j]
            layers.append(self._module_fn(module))
            modules.append(module)
            add_injector()
        return layers, modules

    def _run_group(self, index: int, h: Tensor, step: int, context: tuple, recompute: bool, keep_attention: bool) -> Tensor:
        plan = self.plans[index]
        if plan.pre is not None:
            pre = getattr(self._block(plan.where), plan.pre[0])[plan.pre[1]]
            h = self._run_unwired(pre, h, context[2], recompute=recompute)
        layers, modules = self.group_layers(index, step)
        if not layers:
            return h
        if self.wire_blocks:
            # only the memory-saving backward needs them (a list of every parameter, per call, is host time)
            params = [p for module in modules for p in module.parameters()] if recompute and torch.is_grad_enabled() else []
            return self.wirings[plan.key](h, layers, context, params, recompute, keep_attention)
        for layer in layers:
            h = layer(h, *context)
        return h

    def _run_unwired(self, layer, *args, recompute: bool) -> Tensor:
        """A layer outside the wired groups (a channel-changing resnet, the output head). With wired
        groups and ``recompute``, it keeps only its input and its convolutions' outputs for backward
        (:func:`~idm.unets.conv_outputs_only.conv_outputs_only`): the groups keep only their ends, so
        these layers are most of what a step stores."""
        if self.wire_blocks and recompute and self.lean_unwired:
            return conv_outputs_only(layer, *args)
        return layer(*args)

    def _output_head(self, h: Tensor) -> Tensor:
        unet = self.unet
        return full_precision(unet.conv_out, unet.conv_act(unet.conv_norm_out(h)))

    def time_embedding(self, timestep: int | Tensor, batch: int, like: Tensor) -> Tensor | None:
        """The U-Net's own time embedding of ``timestep`` (only with a kept time input)."""
        if not self.keep_time:
            return None
        t = torch.as_tensor(timestep, device=like.device).reshape(-1).expand(batch)
        emb = self.unet.time_embedding(self.unet.time_proj(t).to(like.dtype))
        activation = getattr(self.unet, "time_embed_act", None)  # UNet2DConditionModel's time_embedding_act_fn
        return emb if activation is None else activation(emb)

    def forward(
        self,
        x: Tensor,
        step: int,
        op: Any,
        x_pinv: Tensor,
        recompute: bool = True,
        timestep: int | Tensor | None = None,
        keep_attention: bool = False,
    ) -> Tensor:
        """Noise estimate for ``x`` ``(B, C_img, H, W)`` at sampling step index ``step`` (0-based).

        ``op`` and ``x_pinv = A^+ y`` feed the injectors; ``timestep`` is used
        only when the U-Net kept its time embedding. ``recompute``: the wired
        groups' memory-saving backward; ``keep_attention``: with it, their
        attention products are kept for the recomputation
        (:mod:`idm.attention_replay`).
        """
        if self.keep_time and timestep is None:
            raise ValueError("this U-Net kept its time embedding: pass the timestep")
        image_shape = x.shape
        if self.separate_channels:
            x = x.reshape(-1, 1, *image_shape[-2:])
        _, _, height, width = x.shape
        multiple = self.unshuffle * 2**self.num_downsamplers
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        h = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        if self.unshuffle > 1:
            h = F.pixel_unshuffle(h, self.unshuffle)
        temb = self.time_embedding(timestep, x.shape[0], x) if self.keep_time else None
        context = (op, x_pinv, temb)
        unet = self.unet
        h = full_precision(unet.conv_in, h)  # float32 under autocast, as conv_out: idm.precision
        skips = [h]
        groups = iter(range(len(self.plans)))
        for block in unet.down_blocks:
            for _ in block.resnets:
                h = self._run_group(next(groups), h, step, context, recompute, keep_attention)
                skips.append(h)
            if block.downsamplers is not None:
                for sampler in block.downsamplers:
                    h = self._resample(sampler, h, temb)
                skips.append(h)
        if unet.mid_block is not None:
            h = self._run_group(next(groups), h, step, context, recompute, keep_attention)
        for block in unet.up_blocks:
            for resnet in block.resnets:
                skip = skips.pop()
                need = resnet.in_channels - skip.shape[1]
                if h.shape[1] != need:  # pruned bottleneck: repeat channels to the kept up block's width
                    h = h.repeat(1, need // h.shape[1], 1, 1)
                h = torch.cat([h, skip], dim=1)
                h = self._run_group(next(groups), h, step, context, recompute, keep_attention)
            if block.upsamplers is not None:
                for sampler in block.upsamplers:
                    h = self._resample(sampler, h, temb)
        h = self._run_unwired(self._output_head, h, recompute=recompute)
        if self.unshuffle > 1:
            h = F.pixel_shuffle(h, self.unshuffle)
        return h[..., :height, :width].reshape(image_shape)
