"""Wired (reversible) sequences and their memory-saving backward.

"Wiring" (paper Sec. 3.3) turns a chain of arbitrary layers ``F_1 .. F_K``
into an invertible network by carrying a second state along. Layer ``k``
maps a pair ``(x1, x2)`` to::

    forward:  x1' = (1 - v_k) * F_k(x1) + v_k * x2,     x2' = x1
    inverse:  x1  = x2',                                 x2  = (x1' - (1 - v_k) * F_k(x2')) / v_k

(``u_k = 1 - v_k`` in the paper's Eqs. 4-5). A :class:`WiredSequence` starts
from ``(x, in_scale * x)`` and returns ``x1 + out_scale * x2``; with the
paper's initialisation (``v = 0.5``, ``in_scale = 1``, ``out_scale = 0``).

The same module serves both levels of IDM: the T sampling steps (first level)
and the equal-width blocks inside the U-Net (second level), which are nested
inside the steps.

Memory. With ``recompute=True`` the chain runs inside one autograd function
that keeps only its final pair ``(x1, x2)`` and its context tensors. The
backward walks the layers in reverse, recovers each layer's input from its
output with the inverse above, recomputes ``F_k`` with autograd enabled for
that layer only, and back-propagates through it. Activation memory is thus
that of a single layer, whatever ``K``. With ``keep_last_graph`` the last
layer runs with autograd in the forward already and its graph is kept for
the backward, which then recomputes ``K - 1`` layers instead of ``K``: the
walk's peak (one layer's graph) is reached at the end of the forward
instead of at the start of the backward, so an outermost chain saves one
layer's recomputation for no memory (IDM's steps: one U-Net pass of ``T``
per training iteration). Chains nested in a layer of another should not
keep theirs: all of them would hold their last layer at once. The gradients of parameters shared
by the layers (IDM's U-Net, used by every step) and of the context tensors
are summed by autograd in place in their ``.grad`` (the parameters' own is
set aside during the walk and restored), so the
walk holds one parameter-sized set of gradients, as plain autograd does,
rather than running sums beside each layer's own. A chain nested in a
layer of another (IDM's wired U-Net blocks inside a wired step) finds its
parameters' ``.grad`` already taken over by the enclosing walk: it adds its
gradients to that running sum directly and returns none for them, instead
of starting a second set beside it (:data:`GRAD_TAKEN_OVER`). With
``keep_attention`` each layer's attention products are recorded in the
forward and replayed in its recomputation (:mod:`idm.attention_replay`):
faster, for the memory of one walk's attention inputs and outputs. Layers must be
deterministic (no dropout or other randomness): the recomputation must
reproduce the forward.

Layers are passed at call time as callables ``layer(x, *context) -> Tensor``
with the shape of ``x``. ``context`` is a tuple whose tensor items (for IDM:
``A^+ y``) get gradients; other items (the operator) pass through untouched.
``params`` lists every parameter the layers use, so that the backward can
return their gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from idm.attention_replay import AttentionRecord

Layer = Callable[..., Tensor]

#: Attribute a walk sets on the parameters whose ``.grad`` it has taken over (set aside, to be summed in place
#: and handed back); a nested walk that finds it accumulates into that ``.grad`` instead of taking it over.
GRAD_TAKEN_OVER = "_idm_wired_walk_sums_into_grad"


def _lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
    """``start + weight * (end - start)`` in one pass over the state, in the wider of the two inputs' dtypes."""
    dtype = torch.promote_types(start.dtype, end.dtype)
    return torch.lerp(start.to(dtype), end.to(dtype), weight.to(dtype))


def coupling_forward(f_x1: Tensor, x1: Tensor, x2: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """One wired layer forward, given ``f_x1 = F(x1)``: returns ``(x1', x2')``.

    ``(1 - v) * f_x1 + v * x2`` is computed as one ``torch.lerp`` pass over the
    state (three element-wise passes otherwise; the state is memory-bound work
    on every device), in the wider of the two inputs' dtypes.
    """
    return _lerp(f_x1, x2, v), x1


def coupling_inverse(f_x1: Tensor, y1: Tensor, v: Tensor, inverse_v: Tensor | None = None) -> Tensor:
    """Recover ``x2`` from the output ``y1`` and ``f_x1 = F(x1)`` where ``x1 = y2``.

    ``(y1 - (1 - v) * f_x1) / v = f_x1 + (y1 - f_x1) / v``: one ``torch.lerp`` with weight ``1 / v``
    (``inverse_v`` when the caller has it already).
    """
    return _lerp(f_x1, y1, v.reciprocal() if inverse_v is None else inverse_v)


def _unique_trainable(params: Iterable[Tensor], exclude: Sequence[Tensor]) -> list[Tensor]:
    seen = {id(t) for t in exclude}
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class _WiredChain(torch.autograd.Function):
    """Autograd function: the whole chain forward without storing, backward by inversion.

    Inputs: ``spec`` (python object with layers and context layout), ``x1``,
    ``x2``, ``v`` (K,), then the context tensors, then the parameters.
    """

    @staticmethod
    def forward(ctx, spec: "_ChainSpec", x1: Tensor, x2: Tensor, v: Tensor, *tensors: Tensor):
        context_tensors = tensors[: spec.n_context]
        context = spec.context(context_tensors)
        x1_in = x1
        start_scale = x2 if spec.scaled_start else None
        if spec.scaled_start:
            x2 = start_scale * x1
        recomputed = len(spec.layers) - 1 if spec.keep_last_graph else len(spec.layers)
        records = [AttentionRecord() for _ in range(recomputed)] if spec.keep_attention else None
        for k in range(recomputed):
            with records[k].recording() if records else contextlib.nullcontext():
                f_x1 = spec.layers[k](x1, *context)
            x1, x2 = coupling_forward(f_x1, x1, x2, v[k])
        ctx.records = records
        ctx.kept = None
        if spec.keep_last_graph:
            # The last layer with autograd on detached inputs; its graph waits in ctx for the backward.
            layer_input = x1.detach().requires_grad_(True)
            needs_ctx = ctx.needs_input_grad[4 : 4 + spec.n_context]
            context_leaves = [t.detach().requires_grad_(need) for t, need in zip(context_tensors, needs_ctx)]
            with torch.enable_grad():
                f_x1 = spec.layers[-1](layer_input, *spec.context(context_leaves))
            ctx.kept = _KeptLayer(layer_input, context_leaves, f_x1)
            x1, x2 = coupling_forward(f_x1.detach(), x1, x2, v[-1])
        if x2 is x1_in:  # K == 1: an output may not alias an input
            x2 = x2.clone()
        ctx.spec = spec
        ctx.autocast = spec.autocast_state(x1.device.type)
        ctx.save_for_backward(x1, x2, v, start_scale, *context_tensors)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1: Tensor | None, dy2: Tensor | None):
        if torch.is_grad_enabled():  # create_graph=True: this walk's gradients would not be differentiable
            raise RuntimeError(
                "the memory-saving backward (recompute=True) computes first-order gradients only; for a gradient "
                "of a gradient (create_graph=True) run the model with recompute=False"
            )
        spec: _ChainSpec = ctx.spec
        y1, y2, v, start_scale, *context_tensors = ctx.saved_tensors
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2
        params = spec.params
        n_c = spec.n_context
        needs_ctx = ctx.needs_input_grad[4 : 4 + n_c]
        # per-layer scalars for the whole walk at once: fewer small kernels per layer (the host's time at small batches)
        v = v.detach()
        u, inverse_v = 1 - v, v.reciprocal()
        grad_v_reversed = []
        device_type, autocast_enabled, autocast_dtype, autocast_cache = ctx.autocast
        # Gradients of what every layer uses (the parameters, the context tensors) are summed over the
        # layers by autograd itself, in place, in their ``.grad``: no running sums beside each layer's own.
        # The parameters' ``.grad`` is set aside meanwhile and restored. Parameters whose ``.grad`` an
        # enclosing walk has already taken over keep it: this walk adds to that sum and returns None for them.
        kept: _KeptLayer | None = ctx.kept
        records: list[AttentionRecord] | None = ctx.records
        ctx.kept = ctx.records = None  # used once: a second backward (retain_graph) recomputes every layer
        if kept is not None:
            ctx_inputs = kept.context_leaves
        else:
            ctx_inputs = [t.detach().requires_grad_(need) for t, need in zip(context_tensors, needs_ctx)]
        ctx_wrt = [t for t, need in zip(ctx_inputs, needs_ctx) if need]
        takes_over = [not getattr(p, GRAD_TAKEN_OVER, False) for p in params]
        set_aside = [p.grad if take else None for p, take in zip(params, takes_over)]
        for p, take in zip(params, takes_over):
            if take:
                p.grad = None
                setattr(p, GRAD_TAKEN_OVER, True)
        try:
            for k in reversed(range(len(spec.layers))):
                if kept is not None and k == len(spec.layers) - 1:
                    x1, f_x1 = kept.layer_input, kept.output
                    kept = None
                else:
                    x1 = y2.detach().requires_grad_(True)
                    replay = records[k].replaying() if records else contextlib.nullcontext()
                    autocast = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled,
                                              cache_enabled=autocast_cache)  # fmt: skip
                    with torch.enable_grad(), autocast, replay:
                        f_x1 = spec.layers[k](x1, *spec.context(ctx_inputs))
                    if records:
                        records[k] = None
                torch.autograd.backward(f_x1, grad_tensors=(u[k] * dy1).to(f_x1.dtype), inputs=[x1, *ctx_wrt, *params])
                with torch.no_grad():
                    f_x1 = f_x1.detach()
                    x2 = coupling_inverse(f_x1, y1, v[k], inverse_v[k])
                    grad_v_reversed.append((dy1 * (x2 - f_x1)).sum())
                    dx1 = dy2 if x1.grad is None else x1.grad + dy2
                    dx2 = v[k] * dy1
                del f_x1
                y1, y2, dy1, dy2 = x1.detach(), x2, dx1, dx2
            grad_v = torch.stack(grad_v_reversed[::-1]).to(v.dtype)
            grad_params = [p.grad if take else None for p, take in zip(params, takes_over)]
            if spec.scaled_start:  # x2 was start_scale * x1, and y1 is now the x1 it was made from
                grad_scale = (dy2 * y1).sum().to(start_scale.dtype) if ctx.needs_input_grad[2] else None
                dy1, dy2 = dy1 + start_scale.to(dy2.dtype) * dy2, grad_scale
        finally:
            for p, take, g in zip(params, takes_over, set_aside):
                if take:
                    p.grad = g
                    delattr(p, GRAD_TAKEN_OVER)
        return (None, dy1, dy2, grad_v, *(t.grad for t in ctx_inputs), *grad_params)


class _KeptLayer(NamedTuple):
    """The last layer's graph, built in the forward with ``keep_last_graph``: its input leaf, the context
    leaves it used (the backward's other layers use them too, so their ``.grad`` sums every layer's part),
    and its output ``F(x1)``."""

    layer_input: Tensor
    context_leaves: list[Tensor]
    output: Tensor


class _ChainSpec:
    """What the autograd function needs besides tensors: layers, context layout, params."""

    def __init__(self, layers: Sequence[Layer], context: tuple[Any, ...], params: list[Tensor], keep_last_graph: bool = False,
                 scaled_start: bool = False, keep_attention: bool = False):  # fmt: skip
        self.layers = list(layers)
        self.keep_attention = keep_attention
        self.scaled_start = scaled_start
        self.template = context
        self.tensor_slots = [i for i, c in enumerate(context) if torch.is_tensor(c)]
        self.n_context = len(self.tensor_slots)
        self.params = params
        self.keep_last_graph = keep_last_graph

    def context_tensors(self) -> list[Tensor]:
        return [self.template[i] for i in self.tensor_slots]

    def context(self, tensors: Sequence[Tensor]) -> tuple[Any, ...]:
        items = list(self.template)
        for slot, t in zip(self.tensor_slots, tensors):
            items[slot] = t
        return tuple(items)

    @staticmethod
    def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype, bool]:
        """The forward's autocast, for the backward's recomputation (which runs where autocast is off):
        ``(device type, enabled, dtype, weight cache enabled)``."""
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        return (device_type, enabled, dtype, torch.is_autocast_cache_enabled())


def wired_chain(
    layers: Sequence[Layer],
    v: Tensor,
    x1: Tensor,
    x2: Tensor,
    context: tuple[Any, ...] = (),
    params: Iterable[Tensor] = (),
    recompute: bool = True,
    keep_last_graph: bool = False,
    keep_attention: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run ``len(layers)`` wired layers on ``(x1, x2)``; returns the final pair.

    Args:
        layers: callables ``layer(x, *context)`` returning a tensor shaped like ``x``.
        v: ``(K,)`` mixing weights, one per layer (``u = 1 - v``).
        x1, x2: the pair of states, same shape; or ``x2`` a scalar tensor ``s`` for the pair
            ``(x1, s * x1)`` (a :class:`WiredSequence`'s start: with ``recompute`` the backward then
            takes ``s``'s gradient from the ``x1`` it recovers, where autograd would keep ``x1``
            alive for it, one state of memory).
        context: extra arguments for every layer; tensor items receive gradients.
        params: parameters used by the layers (needed only with ``recompute``); leaf tensors.
        recompute: keep only the final pair and rebuild the rest in backward
            (memory flat in K); ``False`` runs plain autograd.
        keep_last_graph: with ``recompute``, build the last layer's graph in the forward
            and keep it, so the backward recomputes ``K - 1`` layers (for an outermost chain).
        keep_attention: with ``recompute``, the layers' attention products are recorded in the
            forward and replayed, not recomputed, in the backward (:mod:`idm.attention_replay`; for
            chains of transformer blocks, not for chains of chains: an outer chain would keep every
            inner layer's attention at once).
    """
    if len(layers) != v.shape[0]:
        raise ValueError(f"wired_chain got {len(layers)} layers but {v.shape[0]} mixing weights")
    scaled_start = x2.dim() == 0
    tensors_need_grad = any(t.requires_grad for t in (x1, x2, v) + tuple(c for c in context if torch.is_tensor(c)))
    params = list(params)
    if recompute and torch.is_grad_enabled() and (tensors_need_grad or any(p.requires_grad for p in params)):
        spec = _ChainSpec(layers, context, _unique_trainable(params, exclude=[v, x2]), keep_last_graph, scaled_start,
                          keep_attention)  # fmt: skip
        if not all(p.is_leaf for p in spec.params):
            raise ValueError("wired_chain(recompute=True) needs leaf tensors (parameters) in params: their gradients "
                             "are summed in their .grad; pass the parameters a computed weight is made from")
        return _WiredChain.apply(spec, x1, x2, v, *spec.context_tensors(), *spec.params)
    if scaled_start:
        x2 = x2 * x1
    for k, layer in enumerate(layers):
        x1, x2 = coupling_forward(layer(x1, *context), x1, x2, v[k])
    return x1, x2


class WiredSequence(nn.Module):
    """The learnable scalars of one wired chain: ``v`` per layer, ``in_scale``, ``out_scale``.

    ``forward(x, layers, context, params, recompute, keep_attention)`` computes
    ``x1 + out_scale * x2`` where ``(x1, x2) = chain(x, in_scale * x)``.
    At the first level ``in_scale``/``out_scale`` are the paper's ``w_T``/``w_0``.

    Args:
        num_layers: number of wired layers ``K``.
        v_init: initial mixing weight (paper: 0.5).
        in_scale_init: initial ``w_T`` (1.0).
        out_scale_init: initial ``w_0`` (0.0).
        keep_last_graph: see :func:`wired_chain`; for an outermost chain (IDM's steps). Not part
            of the state dict.
    """

    def __init__(self, num_layers: int, v_init: float = 0.5, in_scale_init: float = 1.0, out_scale_init: float = 0.0,
                 keep_last_graph: bool = False):  # fmt: skip
        super().__init__()
        self.keep_last_graph = keep_last_graph
        if num_layers < 1:
            raise ValueError(f"a wired sequence needs at least one layer, got {num_layers}")
        self.v = nn.Parameter(torch.full((num_layers,), float(v_init)))
        self.in_scale = nn.Parameter(torch.tensor(float(in_scale_init)))
        self.out_scale = nn.Parameter(torch.tensor(float(out_scale_init)))

    @property
    def num_layers(self) -> int:
        return self.v.shape[0]

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}" + (", keep_last_graph=True" if self.keep_last_graph else "")

    def forward(
        self,
        x: Tensor,
        layers: Sequence[Layer],
        context: tuple[Any, ...] = (),
        params: Iterable[Tensor] = (),
        recompute: bool = True,
        keep_attention: bool = False,
    ) -> Tensor:
        x1, x2 = wired_chain(layers, self.v, x, self.in_scale, context, params, recompute, self.keep_last_graph,
                             keep_attention)  # fmt: skip
        return x1 + self.out_scale * x2

    def layer_forward(self, k: int, layer: Layer, x1: Tensor, x2: Tensor, context: tuple[Any, ...] = ()):
        """Layer ``k`` alone: ``(x1, x2) -> (x1', x2')``."""
        return coupling_forward(layer(x1, *context), x1, x2, self.v[k])

    def layer_inverse(self, k: int, layer: Layer, y1: Tensor, y2: Tensor, context: tuple[Any, ...] = ()):
        """Inverse of :meth:`layer_forward`: ``(x1', x2') -> (x1, x2)``."""
        return y2, coupling_inverse(layer(y2, *context), y1, self.v[k])
