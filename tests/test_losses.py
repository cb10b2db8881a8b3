"""Training losses: the differentiable SSIM equals the benchmarks' SSIM; ``--ssim-weight`` and ``--log-loss`` reach the loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from idm.cli import main
from idm.metrics import ssim
from idm.train import TrainConfig
from idm.training.losses import LOG_FLOOR, ReconstructionLoss, differentiable_ssim, per_image_ssim
from tasks import get as get_task
from tests.test_train import BASE, read_log, write_images


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ref = torch.rand(shape, generator=gen, dtype=torch.float64)
    return (ref + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1), ref


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 3, 20, 17), (1, 2, 7, 9)])
def test_differentiable_ssim_equals_the_benchmark_ssim(shape):
    x, ref = _pair(shape)
    expected = sum(ssim(x[i], ref[i]) for i in range(shape[0])) / shape[0]
    assert abs(differentiable_ssim(x, ref).item() - expected) < 1e-12
    assert differentiable_ssim(ref, ref).item() == pytest.approx(1.0, abs=1e-15)


def test_differentiable_ssim_gradient_matches_finite_differences():
    x, ref = _pair((1, 1, 9, 10), seed=1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: differentiable_ssim(a, ref), (x,), eps=1e-6, atol=1e-8)


def test_differentiable_ssim_refuses_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        differentiable_ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="at least 7x7"):
        differentiable_ssim(torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8))


def test_reconstruction_loss_is_l1_plus_the_weighted_ssim_term():
    x_hat, x = _pair((2, 1, 12, 12), seed=2)
    l1 = (x_hat - x).abs().mean()
    assert ReconstructionLoss()(x_hat, x).item() == l1.item()
    with_ssim = ReconstructionLoss(0.3)(x_hat, x)
    assert with_ssim.item() == pytest.approx((l1 + 0.3 * (1 - differentiable_ssim(x_hat, x))).item(), abs=1e-14)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ssim_weight"):
            ReconstructionLoss(bad)
        with pytest.raises(ValueError, match="ssim_weight"):
            TrainConfig(ssim_weight=bad)


def test_log_form_is_the_mean_log_of_each_images_loss():
    x_hat, x = _pair((3, 2, 12, 12), seed=3)
    x_hat = x + (x_hat - x) * torch.tensor([1.0, 4.0, 0.25], dtype=x.dtype).view(3, 1, 1, 1)  # three error sizes
    each = (x_hat - x).abs().mean(dim=(1, 2, 3)) + 0.3 * (1 - per_image_ssim(x_hat, x))
    assert torch.allclose(ReconstructionLoss(0.3).per_image(x_hat, x), each, rtol=0, atol=1e-14)
    assert ReconstructionLoss(0.3)(x_hat, x).item() == pytest.approx(each.mean().item(), abs=1e-14)
    logged = ReconstructionLoss(0.3, log_form=True)(x_hat, x).item()
    assert logged == pytest.approx(torch.log(each + LOG_FLOOR).mean().item(), abs=1e-14)
    assert logged < 0  # losses below 1: the logged value of a --log-loss run is negative
    assert per_image_ssim(x_hat, x).mean().item() == pytest.approx(differentiable_ssim(x_hat, x).item(), abs=1e-15)


@pytest.mark.parametrize("log_form", [False, True])
def test_log_form_weighs_a_small_error_as_much_as_a_large_one(log_form):
    """Shrinking one image's error by a given fraction lowers the log-form loss by the same amount whatever the
    error's size; the plain mean rewards it in proportion to the size (here 10x more for the 10x larger error)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    error = torch.randn(1, 1, 8, 8, generator=gen, dtype=torch.float64) * torch.tensor([0.01, 0.1], dtype=torch.float64).view(2, 1, 1, 1)
    x_hat = (x + error).requires_grad_(True)
    ReconstructionLoss(log_form=log_form)(x_hat, x).backward()
    gain = (x_hat.grad * error).sum(dim=(1, 2, 3))  # d loss / d(relative size of each image's error)
    assert (gain[1] / gain[0]).item() == pytest.approx(1.0 if log_form else 10.0, rel=1e-3)  # 1e-3: LOG_FLOOR


def test_ssim_on_the_mri_magnitude_has_a_finite_gradient_where_the_image_is_zero():
    magnitude = get_task("mri").metric_image
    x = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    x[..., 2:5, 3:6] = 0.5  # the rest is exactly 0 in both channels
    x_hat = x.clone().requires_grad_(True)
    ReconstructionLoss(1.0, magnitude)(x_hat, x).backward()
    assert torch.isfinite(x_hat.grad).all()


def test_ssim_weight_flag_adds_the_term_to_the_logged_loss(tmp_path):
    data = write_images(tmp_path / "data")
    one = ["--data", str(data), "--iters", "1"]
    assert main([*BASE, *one, "--out", str(tmp_path / "l1")]) == 0
    assert main([*BASE, *one, "--ssim-weight", "0.5", "--out", str(tmp_path / "ssim")]) == 0
    l1, mixed = (float(read_log(tmp_path / name)[0]["loss"]) for name in ("l1", "ssim"))
    assert mixed > l1 + 1e-3  # the same first forward pass, plus 0.5 * (1 - SSIM) of an untrained network
    assert json.loads((tmp_path / "ssim" / "config.json").read_text())["settings"]["ssim_weight"] == 0.5


def test_log_loss_flag_reaches_the_logged_loss_and_the_run_identity(tmp_path):
    data = write_images(tmp_path / "data")
    one = ["--data", str(data), "--iters", "1"]
    assert main([*BASE, *one, "--out", str(tmp_path / "l1")]) == 0
    assert main([*BASE, *one, "--log-loss", "--out", str(tmp_path / "log")]) == 0
    l1, logged = (float(read_log(tmp_path / name)[0]["loss"]) for name in ("l1", "log"))
    assert l1 > 0 and logged == pytest.approx(math.log(l1), abs=0.5)  # the same first forward pass: the log of ~ its loss
    config = json.loads((tmp_path / "log" / "config.json").read_text())
    assert config["identity"]["training"]["log_loss"] is True and config["settings"]["log_loss"] is True
    plain = json.loads((tmp_path / "l1" / "config.json").read_text())
    assert "log_loss" not in plain["identity"]["training"]  # off: runs from before the flag keep their identity


def test_negative_ssim_weight_is_a_clear_cli_error(tmp_path, capsys):
    out = tmp_path / "run"
    data = write_images(tmp_path / "data")
    assert main([*BASE, "--data", str(data), "--iters", "1", "--ssim-weight", "-1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idm train: error:") and "ssim_weight must be a finite number >= 0" in err, err
    assert not out.exists()
