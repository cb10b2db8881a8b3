"""Pruning a diffusers U-Net the way the IDM authors pruned SD v1.5.

The authors remove the time embedding (and every resnet's time projection),
the mid block, cross-attention (``attn2`` and its norm) in every transformer
block, and the two deepest scales (down blocks 3-4, up blocks 1-2). Dropping
scales leaves one skip feature too many: the last kept down block's
downsampler, whose output only the removed up blocks consumed, goes too.
"""

from __future__ import annotations

from torch import nn


def count_scales(unet: nn.Module) -> int:
    """Number of down blocks (scales) of a diffusers U-Net."""
    return len(unet.down_blocks)


def prune_unet(
    unet: nn.Module,
    keep_scales: int | None = None,
    keep_mid: bool = True,
    keep_time: bool = False,
    keep_cross_attention: bool = False,
) -> nn.Module:
    """Remove parts of a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` in place.

    Args:
        unet: the model; modified in place and returned.
        keep_scales: keep the first ``k`` down blocks and the last ``k`` up blocks
            (``None`` keeps all).
        keep_mid: keep the mid block.
        keep_time: keep the time embedding (only to reproduce a DDPM sampler).
        keep_cross_attention: keep ``attn2`` in transformer blocks.
    """
    total = count_scales(unet)
    k = total if keep_scales is None else int(keep_scales)
    if not 1 <= k <= total:
        raise ValueError(f"keep_scales must be between 1 and {total} for this U-Net, got {keep_scales}")
    if k < total:
        unet.down_blocks = unet.down_blocks[:k]
        unet.up_blocks = unet.up_blocks[total - k :]
        unet.down_blocks[-1].downsamplers = None
        if keep_mid:
            raise ValueError("the mid block cannot be kept when scales are pruned (its width no longer fits)")
    if not keep_mid:
        unet.mid_block = None
    if not keep_time:
        for name in ("time_proj", "time_embedding", "class_embedding", "add_embedding"):
            if hasattr(unet, name):
                setattr(unet, name, None)
        for module in unet.modules():
            if getattr(module, "time_emb_proj", None) is not None:
                module.time_emb_proj = None
    if not keep_cross_attention:
        for module in unet.modules():
            if getattr(module, "attn2", None) is not None:
                module.attn2 = None
                module.norm2 = None
    if hasattr(unet, "encoder_hid_proj"):
        unet.encoder_hid_proj = None
    # GLIGEN grounding (attention_type="gated"): a conditioning input IDM never gives; its layers would be dead weights
    if getattr(unet, "position_net", None) is not None:
        unet.position_net = None
    for module in unet.modules():
        if getattr(module, "fuser", None) is not None:
            module.fuser = None
    return unet
