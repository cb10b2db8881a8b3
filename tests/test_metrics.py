"""Tests of idm.metrics (PSNR/SSIM via scikit-image and the IDM CS protocol)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from idm.metrics import batched_metrics, cs_protocol_metrics, psnr, ssim


def _img(shape=(32, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


def test_psnr_of_known_mse():
    ref = _img()
    x = ref + 0.1  # MSE = 0.01 -> 20 dB for peak 1
    assert psnr(x, ref) == pytest.approx(20.0, abs=1e-9)
    assert psnr(x, ref, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-9)
    noise = np.random.default_rng(1).normal(0, 0.05, ref.shape)
    mse = np.mean(noise**2)
    assert psnr(ref + noise, ref) == pytest.approx(10 * math.log10(1 / mse), abs=1e-9)
    # torch input, (C, H, W) input give the same numbers
    assert psnr(torch.from_numpy(x).float(), torch.from_numpy(ref).float()) == pytest.approx(20.0, abs=1e-4)
    assert psnr(np.stack([x, x, x]), np.stack([ref] * 3)) == pytest.approx(20.0, abs=1e-9)
    assert psnr(ref, ref) == math.inf


def test_ssim_identity_and_channels():
    ref = _img((3, 24, 20))
    assert ssim(ref, ref) == pytest.approx(1.0)
    assert ssim(ref[0], ref[0]) == pytest.approx(1.0)
    noisy = np.clip(ref + np.random.default_rng(2).normal(0, 0.1, ref.shape), 0, 1)
    s = ssim(noisy, ref)
    assert 0 < s < 1
    per_channel = np.mean([ssim(noisy[c], ref[c]) for c in range(3)])
    assert s == pytest.approx(per_channel, abs=1e-12)
    assert ssim(noisy[:1], ref[:1]) == pytest.approx(ssim(noisy[0], ref[0]), abs=1e-12)
    assert ssim(torch.from_numpy(noisy), torch.from_numpy(ref)) == pytest.approx(s, abs=1e-12)


def test_cs_protocol_matches_unit_range_metrics():
    ref = _img((1, 32, 32))
    x = np.clip(ref + np.random.default_rng(3).normal(0, 0.05, ref.shape), 0, 1)
    p, s = cs_protocol_metrics(x, ref)
    assert p == pytest.approx(psnr(x, ref, data_range=1.0), abs=1e-9)
    assert s == pytest.approx(ssim(x, ref, data_range=1.0), abs=1e-9)
    p2, _ = cs_protocol_metrics(torch.from_numpy(x[0]), torch.from_numpy(ref[0]))
    assert p2 == pytest.approx(p, abs=1e-9)


def test_cs_protocol_clamps_x_hat():
    ref = _img((32, 32))
    x = ref + np.random.default_rng(4).normal(0, 0.3, ref.shape)
    assert x.min() < 0 and x.max() > 1
    clamped = np.clip(x, 0, 1)
    assert cs_protocol_metrics(x, ref) == pytest.approx(cs_protocol_metrics(clamped, ref))
    assert cs_protocol_metrics(x, ref)[0] > psnr(x, ref)  # clamping removes error


def test_batched_metrics():
    ref = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x = (ref + 0.05).clamp(0, 1)
    p, s = batched_metrics(x, ref)
    assert isinstance(p, list) and len(p) == 3 and len(s) == 3
    assert p[1] == pytest.approx(psnr(x[1], ref[1]))
    assert s[2] == pytest.approx(ssim(x[2], ref[2]))
    pc, sc = batched_metrics(x, ref, cs_protocol=True)
    assert pc == pytest.approx(p, abs=1e-6) and sc == pytest.approx(s, abs=1e-6)
    rgb_x, rgb_ref = x.repeat(1, 3, 1, 1), ref.repeat(1, 3, 1, 1)
    pr, sr = batched_metrics(rgb_x, rgb_ref, cs_protocol=True)  # RGB: the same error in every channel
    assert pr == pytest.approx(pc, abs=1e-6) and sr == pytest.approx(sc, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(3, H, W\) RGB"):
        batched_metrics(x.repeat(1, 2, 1, 1), ref.repeat(1, 2, 1, 1), cs_protocol=True)
    with pytest.raises(ValueError, match="x_hat.*B, C, H, W"):
        batched_metrics(x[0], ref[0])
    with pytest.raises(ValueError, match="same shape"):
        batched_metrics(x, ref[:2])
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"x_hat\[1\] contains NaN"):
        batched_metrics(bad, ref)


def test_bad_inputs_name_the_argument():
    ref = _img()
    x = ref.copy()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        psnr(x, ref)
    with pytest.raises(ValueError, match="ref contains NaN"):
        ssim(ref, x)
    with pytest.raises(ValueError, match="x_hat contains NaN"):
        cs_protocol_metrics(x, ref)
    with pytest.raises(ValueError, match="same shape"):
        psnr(ref, ref[:10])
    with pytest.raises(ValueError, match="x must have shape"):
        psnr(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="ref must have shape"):
        ssim(np.zeros((8, 8)), np.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match="x must be"):
        psnr([[0.0]], ref)
    with pytest.raises(ValueError, match="data_range"):
        psnr(ref, ref, data_range=0)
    with pytest.raises(ValueError, match="7x7"):
        ssim(np.zeros((5, 5)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="ref must have values in"):
        cs_protocol_metrics(ref, ref * 2)


def test_integer_images_default_to_their_dtype_range():
    """uint8 images are scored with data_range 255 (as scikit-image), float images with 1: the same PSNR/SSIM."""
    a, b = np.full((8, 8), 100, np.uint8), np.full((8, 8), 110, np.uint8)
    expected = 20 * math.log10(255 / 10)
    assert psnr(a, b) == pytest.approx(expected)
    assert psnr(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected)
    assert psnr(a / 255.0, b / 255.0) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    x, y = (rng.random((16, 16)) * 255).astype(np.uint8), (rng.random((16, 16)) * 255).astype(np.uint8)
    assert ssim(x, y) == pytest.approx(ssim(x / 255.0, y / 255.0), abs=1e-9)
    assert psnr(a, b, data_range=1.0) == pytest.approx(20 * math.log10(1 / 10))  # an explicit range wins
