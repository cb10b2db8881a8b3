"""Attention kept from the forward and replayed in the recomputation (idm.attention_replay), float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idm.attention_replay import AttentionRecord
from idm.wiring import WiredSequence
from tests.conftest import relative_error


def _qkv(tokens: int = 5, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, tokens, 8, dtype=torch.float64, generator=gen) for _ in range(3)]


def test_a_replayed_call_returns_the_recorded_output_and_its_gradient():
    q, k, v = _qkv()
    record = AttentionRecord()
    with torch.no_grad(), record.recording():
        recorded = F.scaled_dot_product_attention(q, k, v)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with record.replaying():
        replayed = F.scaled_dot_product_attention(*inputs)
    assert torch.equal(replayed, recorded)
    grad_out = torch.randn_like(recorded)
    replayed.backward(grad_out)
    direct_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    direct = torch.autograd.grad(F.scaled_dot_product_attention(*direct_inputs), direct_inputs, grad_out)
    for got, want in zip((t.grad for t in inputs), direct):
        assert relative_error(got, want) < 1e-14


def test_a_replay_that_departs_from_the_record_is_a_clear_error():
    q, k, v = _qkv()
    record = AttentionRecord()
    with record.recording():
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match=r"call 1 has inputs of shapes .* recorded"), record.replaying():
        F.scaled_dot_product_attention(*_qkv(tokens=4))
    with pytest.raises(RuntimeError, match="call 1 was not recorded"), AttentionRecord().replaying():
        F.scaled_dot_product_attention(q, k, v)


def test_calls_with_dropout_are_computed_again():
    q, k, v = _qkv()
    record = AttentionRecord()
    with record.recording():
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert record.calls == [None]
    with record.replaying():
        again = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    assert torch.equal(again, F.scaled_dot_product_attention(q, k, v))


class AttentionLayer(nn.Module):
    """``x -> x + attention(x W_q, x W_k, x W_v)`` over the token axis of ``x`` ``(B, N, C)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(channels, channels) for _ in range(3))

    def forward(self, x):
        return torch.tanh(F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x)))


@pytest.mark.parametrize("keep_last_graph", [False, True])
def test_a_chain_keeping_attention_has_plain_autograds_gradients_also_on_a_second_backward(keep_last_graph):
    torch.manual_seed(0)
    layers = nn.ModuleList(AttentionLayer(8) for _ in range(3)).double()
    params = list(layers.parameters())
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)

    def grads(recompute: bool, keep: bool, backwards: int = 1) -> list[list[torch.Tensor]]:
        wiring = WiredSequence(3, keep_last_graph=keep_last_graph).double()
        out = wiring(x, list(layers), (), params, recompute=recompute, keep_attention=keep)
        loss = out.square().sum()
        return [torch.autograd.grad(loss, [x, *params], retain_graph=i + 1 < backwards) for i in range(backwards)]

    (plain,) = grads(recompute=False, keep=False)
    for result in grads(recompute=True, keep=True, backwards=2):  # the second recomputes every layer
        # all together: the key bias's gradient is zero in exact arithmetic (it shifts a query's logits equally)
        assert relative_error(torch.cat([g.flatten() for g in result]), torch.cat([g.flatten() for g in plain])) < 1e-12
