"""The low-resolution form of diffusers' nearest-upsample + 3x3 convolution, and inference preparation."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from idm import IDM, IDMConfig
from idm.precision import full_precision
from idm.unets.upsample import can_fold, upsample
from tests.conftest import relative_error


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_upsampler_matches_diffusers_in_value_and_gradients(memory_format, bias):
    torch.manual_seed(0)
    sampler = Upsample2D(6, use_conv=True, out_channels=5, bias=bias).double().to(memory_format=memory_format)
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64).to(memory_format=memory_format).requires_grad_(True)
    assert can_fold(sampler)
    reference, folded = sampler(x), upsample(sampler, x)
    assert folded.shape == reference.shape == (2, 5, 14, 18)
    assert relative_error(folded, reference) < 1e-13
    if memory_format == torch.channels_last:
        assert folded.is_contiguous(memory_format=torch.channels_last)
    weights = [x, *sampler.parameters()]
    upstream = torch.randn_like(reference)
    for g_ref, g_fold in zip(torch.autograd.grad(reference, weights, upstream), torch.autograd.grad(folded, weights, upstream)):
        assert relative_error(g_fold, g_ref) < 1e-13


def test_upsamplers_that_are_not_nearest_plus_3x3_run_as_they_are():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5, 5)
    for sampler in (Upsample2D(4, use_conv=False), Upsample2D(4, use_conv_transpose=True),
                    Upsample2D(4, use_conv=True, kernel_size=5, padding=2)):  # fmt: skip
        assert not can_fold(sampler)
        assert torch.equal(upsample(sampler, x), sampler(x))


def test_idm_with_and_without_the_fold_and_for_inference_agree(ortho_op):
    torch.manual_seed(0)
    model = IDM(IDMConfig(steps=2)).double().eval()
    op = ortho_op((1, 32, 32), 300)
    y = op.A(torch.rand(2, 1, 32, 32, dtype=torch.float64))
    with torch.no_grad():
        folded = model(y, op)
        model.eps_net.fold_upsamplers = False
        reference = model(y, op)
        model.eps_net.fold_upsamplers = True
        fast = model.for_inference()(y, op)
    assert relative_error(folded, reference) < 1e-12
    assert relative_error(fast, reference) < 1e-12
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    conv = model.eps_net.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)  # the CPU default


def test_bf16_inference_runs_the_unet_in_bf16_and_keeps_states_in_float32(ortho_op):
    torch.manual_seed(0)
    model = IDM(IDMConfig(steps=2)).eval()
    op = ortho_op((1, 32, 32), 300)
    y = op.A(torch.rand(2, 1, 32, 32))
    unet = model.eps_net.unet
    body, ends = [], []  # a resnet convolution's output dtype; conv_in's and conv_out's input and output dtypes
    hooks = [unet.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda _m, _i, out: body.append(out.dtype))]
    for conv in (unet.conv_in, unet.conv_out):
        hooks.append(conv.register_forward_hook(lambda _m, inputs, out: ends.append((inputs[0].dtype, out.dtype))))
    with torch.no_grad():
        reference = model.for_inference(precision="fp32")(y, op)
        fast = model.for_inference(precision="bf16")(y, op)
        _, traces = model.trace(y, op)
        back = model.for_inference(precision="fp32")(y, op)
    for hook in hooks:
        hook.remove()
    assert body == [torch.float32] * 2 + [torch.bfloat16] * 4 + [torch.float32] * 2  # fp32, bf16, trace, fp32
    assert ends == [(torch.float32, torch.float32)] * 16  # the first and last layers stay float32 (idm.precision)
    assert fast.dtype == torch.float32 and all(t.x_prev.dtype == torch.float32 for t in traces)
    assert 0 < relative_error(fast, reference) < 2e-2  # bf16 rounding, not another function
    assert torch.equal(back, reference)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        model.for_inference(precision="fp16")


def test_full_precision_runs_a_layer_in_float32_under_autocast_and_leaves_it_alone_outside():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16  # what autocast does without it
        kept = full_precision(conv, x.bfloat16())
    assert kept.dtype == torch.float32
    assert torch.equal(kept, conv(x.bfloat16().float()))  # float32 arithmetic on the (rounded) input
    wide = full_precision(conv.double(), x.double())  # no autocast: the layer as it is, float64 kept
    assert wide.dtype == torch.float64 and torch.equal(wide, conv(x.double()))
