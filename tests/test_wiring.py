"""The wired sequence and its memory-saving backward, on small generic layers (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from idm.wiring import WiredSequence, wired_chain
from tests.conftest import relative_error, saved_bytes_for_backward


class ConvLayer(nn.Module):
    """``x -> tanh(conv(x)) + scale * ctx``: uses a context tensor, like IDM's steps use ``A^+ y``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, label, ctx):
        assert label == "static item"  # non-tensor context passes through untouched
        return torch.tanh(self.conv(x)) + 0.3 * ctx * x


def _run(recompute: bool, num_layers: int, seed: int = 0, keep_last_graph: bool = False):
    torch.manual_seed(seed)
    layers = nn.ModuleList(ConvLayer(3) for _ in range(num_layers)).double()
    wiring = WiredSequence(num_layers, keep_last_graph=keep_last_graph).double()
    with torch.no_grad():
        wiring.v.uniform_(0.3, 0.7)
        wiring.out_scale.fill_(0.4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    out = wiring(x, list(layers), context=("static item", ctx), params=layers.parameters(), recompute=recompute)
    (out.square().sum() + out.sum()).backward()
    grads = {f"layers.{n}": p.grad for n, p in layers.named_parameters()}
    grads.update({f"wiring.{n}": p.grad for n, p in wiring.named_parameters()})
    grads.update(x=x.grad, ctx=ctx.grad)
    return out.detach(), grads


@pytest.mark.parametrize("keep_last_graph", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 5])
def test_recompute_backward_matches_plain_autograd(num_layers, keep_last_graph):
    out_plain, grads_plain = _run(False, num_layers)
    out_rec, grads_rec = _run(True, num_layers, keep_last_graph=keep_last_graph)
    assert torch.equal(out_plain, out_rec)
    assert set(grads_plain) == set(grads_rec)
    for name, g in grads_plain.items():
        assert relative_error(grads_rec[name], g) < 1e-12, name


@pytest.mark.parametrize("keep_last_graph, scaled_start", [(False, False), (True, False), (True, True)])
def test_gradcheck_of_the_recomputing_chain(keep_last_graph, scaled_start):
    """gradcheck back-propagates each output many times (retain_graph): with ``keep_last_graph`` the first
    backward uses the kept graph, the later ones recompute every layer. A scalar ``x2`` starts the pair
    as ``(x1, x2 * x1)``, and its gradient comes from the ``x1`` the walk recovers."""
    torch.manual_seed(0)
    layers = [ConvLayer(2).double() for _ in range(3)]
    params = [p for layer in layers for p in layer.parameters()]
    v = torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64, requires_grad=True)

    def chain(x1, x2, ctx, v):
        y1, y2 = wired_chain(layers, v, x1, x2, ("static item", ctx), params, recompute=True, keep_last_graph=keep_last_graph)
        return y1, y2

    inputs = [torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)] + [v]
    if scaled_start:
        inputs[1] = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(chain, inputs, eps=1e-6, atol=1e-8)


def test_each_wired_layer_inverse_reproduces_its_input():
    torch.manual_seed(0)
    layers = [ConvLayer(3).double() for _ in range(4)]
    wiring = WiredSequence(4).double()
    ctx = ("static item", torch.randn(1, 3, 8, 8, dtype=torch.float64))
    x1 = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    x2 = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for k, layer in enumerate(layers):
            y1, y2 = wiring.layer_forward(k, layer, x1, x2, ctx)
            r1, r2 = wiring.layer_inverse(k, layer, y1, y2, ctx)
            assert relative_error(r1, x1) < 1e-13 and relative_error(r2, x2) < 1e-13
            x1, x2 = y1, y2


def test_plain_network_is_the_special_case_u1_v0():
    """With v = 0 (u = 1) the wired chain is the original composition (paper Fig. 3)."""
    torch.manual_seed(0)
    layers = [ConvLayer(3).double() for _ in range(3)]
    ctx = ("static item", torch.randn(1, 3, 8, 8, dtype=torch.float64))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    wiring = WiredSequence(3, v_init=0.0).double()
    expected = x
    for layer in layers:
        expected = layer(expected, *ctx)
    with torch.no_grad():
        assert torch.allclose(wiring(x, layers, ctx), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("keep_last_graph", [False, True])
def test_saved_memory_does_not_grow_with_depth(keep_last_graph):
    def saved_bytes(num_layers: int) -> int:
        torch.manual_seed(0)
        layers = [ConvLayer(3) for _ in range(num_layers)]
        params = [p for layer in layers for p in layer.parameters()]
        wiring = WiredSequence(num_layers, keep_last_graph=keep_last_graph)
        x = torch.randn(1, 3, 16, 16, requires_grad=True)
        return saved_bytes_for_backward(
            lambda: wiring(x, layers, ("static item", torch.ones(1)), params, recompute=True), params
        )

    # Only the (K,) mixing-weight vector grows: 11 more float32 values (the kept graph is one layer's).
    assert saved_bytes(12) - saved_bytes(1) == 11 * 4
    state = 3 * 16 * 16 * 4
    if not keep_last_graph:  # the final pair and out_scale's use of x2; not the input x (in_scale's gradient)
        assert saved_bytes(1) < 4 * state
    if keep_last_graph:  # and it is kept: the tanh output, the conv input and ctx * x's x (16x16x3 floats each)
        assert saved_bytes(1) >= 3 * 16 * 16 * 3 * 4


@pytest.mark.parametrize("keep_last_graph", [False, True])
def test_the_kept_last_graph_saves_one_layer_of_recomputation(keep_last_graph):
    """K layers cost 2K layer calls per forward and backward, 2K - 1 with the last layer's graph kept;
    a second backward (retain_graph) recomputes all K and gives the same gradients."""
    torch.manual_seed(0)
    calls = []
    conv = ConvLayer(3).double()

    def layer(x, label, ctx):
        calls.append(1)
        return conv(x, label, ctx)

    wiring = WiredSequence(4, keep_last_graph=keep_last_graph).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    out = wiring(x, [layer] * 4, ("static item", ctx), list(conv.parameters()), recompute=True)
    assert len(calls) == 4
    first = torch.autograd.grad(out.square().sum(), [x, ctx, *conv.parameters()], retain_graph=True)
    assert len(calls) == (7 if keep_last_graph else 8)
    second = torch.autograd.grad(out.square().sum(), [x, ctx, *conv.parameters()])
    assert len(calls) == (11 if keep_last_graph else 12)
    for a, b in zip(first, second):
        assert relative_error(a, b) < 1e-13


@pytest.mark.parametrize("cache_enabled", [True, False])
def test_the_recomputation_runs_under_the_forwards_autocast(cache_enabled):
    """The backward runs where autocast is off; it recomputes each layer under the forward's autocast: on,
    its dtype, and its weight cache setting (off for a region captured as a CUDA graph)."""
    conv = nn.Conv2d(3, 3, 1)
    seen = []

    def layer(x):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_autocast_cache_enabled()))
        return conv(x)

    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache_enabled):
        x1, x2 = wired_chain([layer] * 2, torch.full((2,), 0.5), x, torch.tensor(1.0), params=list(conv.parameters()))
    assert torch.is_autocast_cache_enabled()  # the global setting is back outside the region
    (x1 + x2).sum().backward()
    assert seen == [(True, torch.bfloat16, cache_enabled)] * 4  # 2 in the forward, 2 recomputed


def test_mismatched_weights_are_refused():
    with pytest.raises(ValueError, match="2 layers but 3 mixing weights"):
        wired_chain([lambda x: x, lambda x: x], torch.ones(3), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="at least one layer"):
        WiredSequence(0)


def test_shared_layer_gradients_match_plain_autograd_and_existing_grads_are_kept():
    """One layer used by every position (IDM's U-Net across steps), a .grad from before, and autograd.grad."""
    torch.manual_seed(0)
    shared = ConvLayer(3).double()
    params = list(shared.parameters())
    v = torch.tensor([0.4, 0.5, 0.6, 0.7], dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ctx = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def loss(recompute: bool) -> torch.Tensor:
        y1, y2 = wired_chain([shared] * 4, v, x, 0.5 * x, ("static item", ctx), params, recompute=recompute)
        return (y1.square() + y2).sum()

    expected = torch.autograd.grad(loss(False), params)
    got = torch.autograd.grad(loss(True), params)  # the outer call captures; .grad stays untouched
    assert all(p.grad is None for p in params)
    for g, e in zip(got, expected):
        assert relative_error(g, e) < 1e-12
    before = [torch.randn_like(p) for p in params]
    for p, b in zip(params, before):
        p.grad = b.clone()
    loss(True).backward()
    for p, b, e in zip(params, before, expected):
        assert relative_error(p.grad, b + e) < 1e-12


def test_non_leaf_params_are_refused():
    weight = torch.randn(3, 3, 3, 3, requires_grad=True)
    scaled = 2 * weight  # a computed weight: autograd would not fill its .grad

    def layer(x):
        return torch.conv2d(x, scaled, padding=1)

    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="needs leaf tensors"):
        wired_chain([layer], torch.full((1,), 0.5), x, x, (), [scaled], recompute=True)


def test_observing_gradient_hooks_leave_the_gradients_exact():
    """Hooks that only read (memory trackers, loggers) work: the walk sums each parameter's gradient over the
    layers in several passes, so they may run on partial sums, but the gradients stay plain autograd's."""
    grads = {}
    for recompute in (True, False):
        torch.manual_seed(0)
        layers = nn.ModuleList(ConvLayer(3) for _ in range(3)).double()
        seen = []
        for p in layers.parameters():
            p.register_hook(lambda g: seen.append(g.norm().item()))
            p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.norm().item()))
        x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
        ctx = torch.randn(1, 3, 4, 4, dtype=torch.float64)
        wiring = WiredSequence(3).double()
        wiring(x, list(layers), ("static item", ctx), layers.parameters(), recompute=recompute).square().sum().backward()
        grads[recompute] = [p.grad.clone() for p in layers.parameters()]
        assert seen
    assert all(relative_error(a, b) <= 1e-12 for a, b in zip(grads[True], grads[False]))


def test_a_gradient_of_the_gradient_is_refused():
    """The walk's own gradients are not differentiable: create_graph=True would silently lose terms."""
    layers = nn.ModuleList(ConvLayer(3) for _ in range(2))
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    ctx = torch.randn(1, 3, 4, 4)
    out = WiredSequence(2)(x, list(layers), ("static item", ctx), layers.parameters(), recompute=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def _nested_chain_loss(weight: torch.Tensor, x: torch.Tensor, recompute: bool, keep_last_graph: bool = False) -> torch.Tensor:
    """Two wired layers, each itself a wired chain of two uses of ``weight`` (IDM's wired blocks in wired steps)."""
    inner_v = torch.tensor([0.4, 0.6], dtype=weight.dtype)

    def inner_block(h):
        y1, y2 = wired_chain([lambda z: torch.tanh(z @ weight)] * 2, inner_v, h, h, (), [weight], recompute=recompute)
        return y1 + 0.5 * y2

    outer_v = torch.tensor([0.5, 0.7], dtype=weight.dtype)
    y1, y2 = wired_chain([inner_block] * 2, outer_v, x, x, (), [weight], recompute=recompute, keep_last_graph=keep_last_graph)
    return (y1.square() + y2).sum()


@pytest.mark.parametrize("keep_last_graph", [False, True])
def test_nested_chains_sum_into_the_enclosing_walks_gradient(keep_last_graph):
    """Gradients agree with plain autograd, and the walk holds one set of gradients, not one per nesting
    level; also when the outer chain kept its last layer's graph (the inner chains in it run backward
    inside the outer walk, as in IDM's last step)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    weight = (0.05 * torch.randn(64, 64, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(2, 64, dtype=torch.float64)
    (expected,) = torch.autograd.grad(_nested_chain_loss(weight, x, recompute=False), [weight])
    (got,) = torch.autograd.grad(_nested_chain_loss(weight, x, True, keep_last_graph), [weight])
    assert relative_error(got, expected) < 1e-12 and weight.grad is None

    big = torch.randn(512, 512).div_(512**0.5).requires_grad_(True)  # 1 MiB: dominates the activations (2 KiB)
    tracker = MemTracker()
    with tracker:
        _nested_chain_loss(big, torch.randn(1, 512), True, keep_last_graph).backward()
    peak = max(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())
    set_bytes = big.numel() * big.element_size()
    # the weight, the summed gradient and one use's gradient before it is added (3.04 sets); a second
    # running sum for the inner chains made it 4.03 (plain autograd: 4.01)
    assert peak < 3.5 * set_bytes, f"peak {peak / set_bytes:.2f} parameter sets"
    assert not hasattr(big, "_idm_wired_walk_sums_into_grad")
