"""Convert an IDM's weights between the two colour layouts of ``IDMConfig.separate_channels``.

A model whose U-Net is a one-channel (grey) prior can run a ``C``-channel
image two ways:

* **joint** (``separate_channels=False``): ``conv_in``/``conv_out`` are tiled
  over the ``C`` channels, and each injector maps features to a
  ``C``-channel image and ``3 C`` image channels back;
* **separate** (``separate_channels=True``): every channel runs as its own
  one-channel image, with the grey prior's own ``conv_in``/``conv_out`` and
  one-channel injectors.

All other weights (the U-Net's body, the wiring scalars, the schedule) are
the same in both. :func:`convert_channel_layout` maps the channel-dependent
ones: to separate, input weights are summed over the colours and output
weights averaged (exact for a joint model whose colours are still tied, as
freshly tiled: it then computes, on an image whose channels are equal, what
the separate model computes per channel); to joint, they are tiled (input
weights divided by ``C``), which is exact in the same sense.
"""

from __future__ import annotations

import re

from torch import Tensor

_CONV_IN = re.compile(r"(^|\.)eps_net\.unet\.conv_in\.weight$")
_CONV_OUT = re.compile(r"(^|\.)eps_net\.unet\.conv_out\.(weight|bias)$")
_TO_IMAGE = re.compile(r"(^|\.)eps_net\.injectors\.\d+\.\d+\.to_image\.(weight|bias)$")
_TO_FEATURE = re.compile(r"(^|\.)eps_net\.injectors\.\d+\.\d+\.to_feature\.weight$")


def _merge_inputs(w: Tensor, channels: int, groups: int) -> Tensor:
    """``(O, groups * C * k, ...)`` -> ``(O, groups * k, ...)``: the sum over the ``C`` colours."""
    o, i = w.shape[:2]
    return w.reshape(o, groups, channels, i // (groups * channels), *w.shape[2:]).sum(2).flatten(1, 2)


def _tile_inputs(w: Tensor, channels: int, groups: int) -> Tensor:
    """``(O, groups * k, ...)`` -> ``(O, groups * C * k, ...)``: each colour gets the weight / ``C``."""
    o, i = w.shape[:2]
    w = w.reshape(o, groups, 1, i // groups, *w.shape[2:]) / channels
    return w.expand(o, groups, channels, *w.shape[3:]).flatten(1, 3)


def _merge_outputs(w: Tensor, channels: int) -> Tensor:
    """``(C * k, ...)`` -> ``(k, ...)``: the mean over the ``C`` colours."""
    return w.reshape(channels, w.shape[0] // channels, *w.shape[1:]).mean(0)


def _tile_outputs(w: Tensor, channels: int) -> Tensor:
    """``(k, ...)`` -> ``(C * k, ...)``: every colour gets the same weight."""
    return w.repeat(channels, *([1] * (w.dim() - 1)))


def convert_channel_layout(state_dict: dict[str, Tensor], channels: int, to_separate: bool) -> dict[str, Tensor]:
    """An IDM state dict in the other colour layout (see the module docstring).

    Args:
        state_dict: :meth:`IDM.state_dict` of a model with ``image_channels = channels``.
        channels: ``C``, the image channels.
        to_separate: ``True``: joint -> separate; ``False``: separate -> joint.

    Returns:
        A new dict; tensors that do not depend on the layout are the same objects.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    out: dict[str, Tensor] = {}
    for key, w in state_dict.items():
        if _CONV_IN.search(key):
            w = _merge_inputs(w, channels, 1) if to_separate else _tile_inputs(w, channels, 1)
        elif _TO_FEATURE.search(key):  # inputs: [f, A^+ A f, A^+ y], C channels each
            w = _merge_inputs(w, channels, 3) if to_separate else _tile_inputs(w, channels, 3)
        elif _CONV_OUT.search(key) or _TO_IMAGE.search(key):
            w = _merge_outputs(w, channels) if to_separate else _tile_outputs(w, channels)
        out[key] = w
    return out
