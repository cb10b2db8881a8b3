"""Layers run keeping only their input and their convolutions' outputs (idm.unets.conv_outputs_only)."""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D

from idm.unets.conv_outputs_only import conv_outputs_only
from tests.conftest import relative_error, saved_bytes_for_backward


def _narrowing_resnet() -> ResnetBlock2D:
    """A resnet as in a U-Net's up path: 96 input channels (features and skip) to 32, with its shortcut conv."""
    torch.manual_seed(0)
    return ResnetBlock2D(in_channels=96, out_channels=32, temb_channels=None, groups=8).double()


def _gradients(resnet, run, x):
    x = x.clone().requires_grad_(True)
    out = run(resnet, x)
    (out.square().sum() + out.sum()).backward()
    grads = [x.grad] + [p.grad.clone() for p in resnet.parameters()]
    resnet.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_gradients_equal_plain_autograd_and_fewer_maps_are_saved():
    resnet = _narrowing_resnet()
    x = torch.randn(2, 96, 16, 16, dtype=torch.float64)
    plain_out, plain = _gradients(resnet, lambda r, h: r(h, None), x)
    lean_out, lean = _gradients(resnet, lambda r, h: conv_outputs_only(r, h, None), x)
    assert torch.equal(plain_out, lean_out)
    for g, e in zip(lean, plain):
        assert relative_error(g, e) < 1e-12

    params = list(resnet.parameters())
    x.requires_grad_(True)
    plain_bytes = saved_bytes_for_backward(lambda: resnet(x, None), params)
    lean_bytes = saved_bytes_for_backward(lambda: conv_outputs_only(resnet, x, None), params)
    map_bytes = 2 * 16 * 16 * 8  # one channel of the batch, float64
    # plain: the input three times over (norm, activation, conv inputs) and three 32-channel maps;
    # kept: the input once and the three convolutions' outputs (conv1, conv2, shortcut)
    assert plain_bytes >= (3 * 96 + 3 * 32) * map_bytes
    assert (96 + 3 * 32) * map_bytes <= lean_bytes < (96 + 3 * 32 + 8) * map_bytes


def test_under_autocast_the_recomputation_replays_the_forward():
    """Autocast's weight cache would serve casts in the forward that the backward's replay makes anew."""
    resnet = _narrowing_resnet().float()
    x = torch.randn(2, 96, 16, 16)

    def under_autocast(run):
        def call(r, h):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                r(h, None)  # a first use fills the weight cache, as the steps before do in IDM
                return run(r, h)

        return call

    plain_out, plain = _gradients(resnet, under_autocast(lambda r, h: r(h, None)), x)
    lean_out, lean = _gradients(resnet, under_autocast(lambda r, h: conv_outputs_only(r, h, None)), x)
    assert torch.equal(plain_out, lean_out)
    for g, e in zip(lean, plain):
        assert relative_error(g, e) < 1e-6


def test_without_autograd_the_layer_just_runs():
    resnet = _narrowing_resnet()
    x = torch.randn(1, 96, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(conv_outputs_only(resnet, x, None), resnet(x, None))
