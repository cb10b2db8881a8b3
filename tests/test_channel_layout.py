"""``IDMConfig.separate_channels``: a grey prior run per colour channel, and the weight conversion between layouts."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel

import operators
from idm import IDM, IDMConfig
from idm.channel_layout import convert_channel_layout
from idm.cli import main
from idm.train import load_trained
from idm.unets import tiny_unet_config
from tests.conftest import perturbed_model, relative_error
from tests.test_train import write_images

SIZE = (16, 16)


def _inpainting(channels: int):
    return operators.make("inpainting", img_size=SIZE, channels=channels, ratio=0.5, seed=3)


def _grey_prior(tmp_path) -> str:
    folder = tmp_path / "prior"
    UNet2DModel(**tiny_unet_config(1)).save_pretrained(folder)
    return str(folder)


def test_separate_channels_equal_the_grey_model_on_each_channel():
    """With a channel-wise operator (an RGB inpainting mask), the RGB model is the grey model per channel."""
    separate = perturbed_model(IDMConfig(image_channels=3, steps=2, separate_channels=True)).eval()
    grey = IDM(IDMConfig(image_channels=1, steps=2)).double().eval()
    grey.load_state_dict(separate.state_dict())  # the same tensors: a 1-channel U-Net and 1-channel injectors
    x = torch.rand(2, 3, *SIZE, dtype=torch.float64)
    op3, op1 = _inpainting(3), _inpainting(1)
    with torch.no_grad():
        rgb = separate(op3.A(x), op3)
        per_channel = grey(op1.A(x.reshape(6, 1, *SIZE)), op1).reshape(2, 3, *SIZE)
    assert relative_error(rgb, per_channel) < 1e-12
    assert relative_error(rgb[:, 0], rgb[:, 1]) > 1e-3  # the channels are not tied


def test_separate_channels_keep_the_memory_saving_backward_exact():
    config = IDMConfig(image_channels=3, steps=2, invertible="both", separate_channels=True)
    op = _inpainting(3)
    torch.manual_seed(1)
    x = torch.rand(2, 3, *SIZE, dtype=torch.float64)

    def gradients(recompute: bool):
        model = perturbed_model(config.replace(recompute=recompute))
        y = op.A(x).requires_grad_(True)
        (model(y, op) - x).abs().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, y.grad

    (grads_rec, gy_rec), (grads_plain, gy_plain) = gradients(True), gradients(False)
    assert relative_error(gy_rec, gy_plain) <= 1e-8
    assert set(grads_rec) == set(grads_plain) and len(grads_plain) > 100
    scale = max(g.norm().item() for g in grads_plain.values())
    for name, g in grads_plain.items():
        assert relative_error(grads_rec[name], g, floor=1e-6 * scale) <= 1e-8, name


def test_conversion_between_layouts_is_exact_on_grey_images_and_round_trips(tmp_path):
    """Separate -> joint tiles the colour weights: on an image whose channels are equal, both compute the same."""
    prior = _grey_prior(tmp_path)
    separate = perturbed_model(IDMConfig(unet=prior, image_channels=3, steps=2, separate_channels=True)).eval()
    joint = IDM(IDMConfig(unet=prior, image_channels=3, steps=2)).double().eval()
    joint.load_state_dict(convert_channel_layout(separate.state_dict(), 3, to_separate=False))
    op = _inpainting(3)
    grey = torch.rand(2, 1, *SIZE, dtype=torch.float64).expand(2, 3, *SIZE).contiguous()
    colour = torch.rand(2, 3, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(joint(op.A(grey), op), separate(op.A(grey), op)) < 1e-12
        assert relative_error(joint(op.A(colour), op), separate(op.A(colour), op)) > 1e-3  # only grey images agree
    back = convert_channel_layout(joint.state_dict(), 3, to_separate=True)
    original = separate.state_dict()
    assert back.keys() == original.keys()
    assert max(float((back[k] - original[k]).abs().max()) for k in original) < 1e-12


def test_separate_channels_need_a_one_channel_unet(tmp_path):
    folder = tmp_path / "rgb-prior"
    UNet2DModel(**tiny_unet_config(3)).save_pretrained(folder)
    with pytest.raises(ValueError, match="a U-Net of several input channels needs separate_channels=False"):
        IDM(IDMConfig(unet=str(folder), image_channels=3, separate_channels=True))
    IDM(IDMConfig(unet=str(folder), image_channels=3))  # the joint layout takes it as is
    with pytest.raises(ValueError, match="an image of 2 channel.*cannot be tiled to"):
        IDM(IDMConfig(unet=str(folder), image_channels=2))  # ... but cannot widen 3 channels to 2
    with pytest.raises(ValueError, match="separate_channels must be True or False, got 'yes'"):
        IDMConfig(image_channels=3, separate_channels="yes")


def test_separate_channels_survive_save_and_load(tmp_path):
    model = perturbed_model(IDMConfig(image_channels=3, steps=1, separate_channels=True)).float().eval()
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["idm"]["separate_channels"] is True
    loaded = IDM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    op = _inpainting(3)
    y = op.A(torch.rand(1, 3, *SIZE))
    with torch.no_grad():
        assert torch.equal(loaded(y, op), model(y, op))


def test_train_defaults_to_separate_channels_for_inpainting_and_converts_an_init_from_model(tmp_path):
    data = write_images(tmp_path / "data")
    argv = ["train", "--task", "inpainting", "--color", "rgb", "--crop", "16", "--batch-size", "2",
            "--device", "cpu", "--num-workers", "0", "--no-progress", "--data", str(data), "--iters", "1"]  # fmt: skip
    prior = _grey_prior(tmp_path)
    assert main([*argv, "--steps", "1", "--prior", prior, "--out", str(tmp_path / "default")]) == 0
    assert load_trained(tmp_path / "default").model.config.separate_channels is True
    assert main([*argv, "--steps", "1", "--prior", prior, "--no-separate-channels", "--out", str(tmp_path / "joint")]) == 0
    joint = load_trained(tmp_path / "joint").model
    assert joint.config.separate_channels is False
    assert json.loads((tmp_path / "joint" / "config.json").read_text())["identity"]["model"]["separate_channels"] is False
    tiny_step = ["--lr", "1e-12"]  # Adam moves each weight by about 1e-12: the run keeps the converted weights
    assert main([*argv, *tiny_step, "--init-from", str(tmp_path / "joint"), "--separate-channels",
                 "--out", str(tmp_path / "converted")]) == 0  # fmt: skip
    converted = load_trained(tmp_path / "converted").model
    assert converted.config.separate_channels is True
    expected = convert_channel_layout(joint.state_dict(), 3, to_separate=True)
    got = converted.state_dict()
    assert max(float((got[k] - expected[k]).abs().max()) for k in expected) < 1e-6
