"""Run a layer keeping only its input and its convolutions' outputs for backward.

    h = conv_outputs_only(resnet, h, temb)     # under autograd: same value, fewer saved tensors

A diffusers resnet block ``GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU ->
conv (+ shortcut conv)`` saves, for plain autograd, the input and output of
every one of those layers: the norms' inputs, the activations' inputs and
the convolutions' inputs, six feature maps of which the three before
``conv1`` have the (wider) input's channels. This runs the layer under
torch's selective activation checkpointing: the outputs of the
convolutions are kept, everything else (norms, activations, additions) is
recomputed from them and from the input in the backward. Recomputing those
is element-wise work, memory-bound and cheap beside the convolutions, which
are never recomputed. For a resnet that narrows 960 to 320 channels the
saved maps fall from ``3 x 960 + 3 x 320`` to ``960 + 3 x 320`` channels.

IDM's wired U-Net (``invertible="both"`` with ``recompute``) runs its
channel-changing resnets and its output head this way: with the wired
groups storing only their ends, these layers are most of what a step keeps.
Outside autograd (inference, ``no_grad``) the layer simply runs.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_KEPT = (torch.ops.aten.convolution.default,)

#: torch 2.14 added ``respect_saved_tensors_hooks``: with it the tensors selective checkpointing keeps pass
#: through the caller's saved-tensor hooks (so ``benchmarks.saved_tensors`` sees them, and ``save_on_cpu``
#: would move them); earlier versions, which reject the keyword, keep them aside. No value changes either way.
_THROUGH_HOOKS = (
    {"respect_saved_tensors_hooks": True} if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {}
)


def _keep_convolutions(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT else CheckpointPolicy.PREFER_RECOMPUTE


def _without_autocast_cache(layer: Callable[..., Tensor], *args: Any) -> Tensor:
    """``layer(*args)`` under the caller's autocast with its weight cache off: a cast weight served
    from the cache in the forward but cast anew in the backward's recomputation would break the
    one-to-one replay that selective checkpointing checks."""
    device_type = next(a.device.type for a in args if torch.is_tensor(a))
    if not torch.is_autocast_enabled(device_type):
        return layer(*args)
    with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False):
        return layer(*args)


def conv_outputs_only(layer: Callable[..., Tensor], *args: Any) -> Tensor:
    """``layer(*args)``, saving for backward only the tensor arguments and the convolutions' outputs.

    ``layer`` must be deterministic (it is partly re-run in the backward).
    Gradients equal plain autograd's: the recomputed operations repeat the
    forward's exactly.
    """
    if not torch.is_grad_enabled():
        return layer(*args)
    return checkpoint(
        functools.partial(_without_autocast_cache, layer),
        *args,
        use_reentrant=False,
        preserve_rng_state=False,  # deterministic layers (IDM refuses active dropout): no RNG state to save per call
        context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_convolutions),
        **_THROUGH_HOOKS,
    )
