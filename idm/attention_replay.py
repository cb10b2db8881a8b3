"""Attention kept from a layer's forward for its recomputation in the memory-saving backward.

A wired chain's backward (:mod:`idm.wiring`) runs each layer again, with
autograd, to rebuild the layer's input and to differentiate it. For a
transformer layer most of that time is the attention product itself
(``softmax(Q K^T) V`` over 128x128 tokens in the ``sd15`` U-Net at
256x256). With an :class:`AttentionRecord`, the layer's forward records
each ``torch.nn.functional.scaled_dot_product_attention`` call's small
graph (its inputs ``Q, K, V`` as leaves and its output), and the
recomputation replays them: the recomputed ``Q, K, V`` go in, the recorded
output comes out, and the backward takes its gradient from the recorded
graph. Everything around the attention (projections, norms, feed-forward)
is recomputed as before; only the attention kernel is not run twice.

The price is memory: ``Q, K, V``, the output and the softmax statistics of
every attention call of one layer walk (the wired blocks of one step) stay
alive from the forward until the backward reaches them. The record is a
torch function mode: no module state, so concurrent models do not see each
other's records. The mode sees every torch call the layer makes and passes
all but the attention through (about 2 microseconds each on the project's
CPU machine).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class _RecordedCall(NamedTuple):
    """One attention call of the forward: its inputs as autograd leaves, and its output (with graph)."""

    inputs: tuple[Tensor, Tensor, Tensor]
    output: Tensor


class AttentionRecord:
    """The attention calls of one layer call, recorded in its forward and replayed in its recomputation.

    ``with record.recording(): layer(x)`` in the forward (any grad mode), then
    ``with record.replaying(): layer(x)`` once, with autograd, in the backward.
    The replay must make the same calls in the same order with inputs of the
    same shapes; anything else is a ``RuntimeError`` naming the call.
    """

    def __init__(self) -> None:
        self.calls: list[_RecordedCall] = []

    def recording(self) -> TorchFunctionMode:
        return _Recording(self)

    def replaying(self) -> TorchFunctionMode:
        return _Replaying(self)


def _qkv(args: tuple, kwargs: dict) -> tuple[tuple[Tensor, Tensor, Tensor], tuple, dict]:
    """``((query, key, value), other positional args, other keyword args)`` of an attention call."""
    names = ("query", "key", "value")
    qkv = tuple(args[:3]) + tuple(kwargs[n] for n in names[len(args[:3]) :])
    rest_kwargs = {k: v for k, v in kwargs.items() if k not in names}
    return qkv, tuple(args[3:]), rest_kwargs


def _replayable(kwargs: dict, rest: tuple) -> bool:
    """Calls without dropout and without a mask that needs a gradient (their result is a function of Q, K, V)."""
    mask = rest[0] if rest else kwargs.get("attn_mask")
    dropout = rest[1] if len(rest) > 1 else kwargs.get("dropout_p", 0.0)
    return dropout == 0 and not (isinstance(mask, Tensor) and mask.requires_grad)


class _Recording(TorchFunctionMode):
    def __init__(self, record: AttentionRecord) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        qkv, rest, rest_kwargs = _qkv(args, kwargs)
        if not _replayable(rest_kwargs, rest):
            self.record.calls.append(None)
            return func(*args, **kwargs)
        leaves = tuple(t.detach().requires_grad_(True) for t in qkv)
        with torch.enable_grad():
            output = func(*leaves, *rest, **rest_kwargs)
        self.record.calls.append(_RecordedCall(leaves, output))
        return output.detach()


class _Replaying(TorchFunctionMode):
    def __init__(self, record: AttentionRecord) -> None:
        super().__init__()
        self.record = record
        self.position = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        if self.position >= len(self.record.calls):
            raise RuntimeError(f"attention replay: call {self.position + 1} was not recorded "
                               f"(the forward made {len(self.record.calls)})")  # fmt: skip
        recorded = self.record.calls[self.position]
        self.record.calls[self.position] = None  # the replay owns it now: freed with its backward
        self.position += 1
        if recorded is None:  # not replayable (dropout, a mask with a gradient): computed again
            return func(*args, **kwargs)
        qkv, _, _ = _qkv(args, kwargs)
        if [t.shape for t in qkv] != [t.shape for t in recorded.inputs]:
            raise RuntimeError(f"attention replay: call {self.position} has inputs of shapes "
                               f"{[tuple(t.shape) for t in qkv]}, recorded {[tuple(t.shape) for t in recorded.inputs]}")  # fmt: skip
        return _ReplayedAttention.apply(*qkv, recorded)


class _ReplayedAttention(torch.autograd.Function):
    """``(Q, K, V) -> recorded output``; the backward differentiates the recorded graph."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, recorded: _RecordedCall) -> Tensor:
        ctx.recorded = recorded
        return recorded.output.detach()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):
        recorded: _RecordedCall = ctx.recorded
        ctx.recorded = None
        grads = torch.autograd.grad(recorded.output, recorded.inputs, grad_output)
        return (*grads, None)
