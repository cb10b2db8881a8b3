"""Training losses: the differentiable SSIM equals the benchmarks' SSIM, and ``--ssim-weight`` reaches the loss."""

from __future__ import annotations

import json

import pytest
import torch

from idm.cli import main
from idm.metrics import ssim
from idm.train import TrainConfig
from idm.training.losses import ReconstructionLoss, differentiable_ssim
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


def test_negative_ssim_weight_is_a_clear_cli_error(tmp_path, capsys):
    out = tmp_path / "run"
    data = write_images(tmp_path / "data")
    assert main([*BASE, "--data", str(data), "--iters", "1", "--ssim-weight", "-1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idm train: error:") and "ssim_weight must be a finite number >= 0" in err, err
    assert not out.exists()
