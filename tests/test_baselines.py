"""Reconstruction baselines (benchmarks/): prior-space map, pinv, TV, DDNM, DPS, the factory.

CPU only, tiny random priors, 16x16 / 32x32 images, a few steps; no data files.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DModel

import operators
from benchmarks.classical import TV, tune_tv_weight
from benchmarks.ddnm import DDNM
from benchmarks.dps import DPS, dps_guidance, dps_step, dps_timesteps, size_scaled_step, tune_dps_step
from benchmarks.methods import available_methods, check_method, make_method, needs_prior
from benchmarks.pinv import PseudoInverse
from benchmarks.prior import DiffusionPrior, PriorError, PriorSpace, load_prior
from idm import IDM, IDMConfig
from idm.step import ddpm_alphas_cumprod
from idm.unets import tiny_unet_config
from tests.conftest import host_reads, relative_error

F64 = torch.float64
SIZE = (16, 16)

# name -> (registry name, kwargs); channels decide which tiny prior is used.
OPS = {
    "cs": ("cs", dict(img_size=SIZE, channels=1, ratio=0.5, block=8, mode="spatial")),
    "cs-rgb": ("cs", dict(img_size=SIZE, channels=3, ratio=0.3, block=8, mode="permuted", seed=2)),
    "inpainting": ("inpainting", dict(img_size=SIZE, channels=1, mask="random", ratio=0.5, seed=1)),
    "inpainting-rgb": ("inpainting", dict(img_size=SIZE, channels=3, mask="box", box_fraction=0.4)),
    "mri": ("mri", dict(img_size=SIZE, acceleration=4, center_fraction=0.08, seed=3)),
    "ct": ("ct", dict(img_size=SIZE, channels=1, views=8)),
}
EXACT = ["cs", "cs-rgb", "inpainting", "inpainting-rgb", "mri"]


def make_op(case: str):
    name, kwargs = OPS[case]
    return operators.make(name, **kwargs)


@pytest.fixture(scope="module")
def ops():
    return {case: make_op(case) for case in OPS}


def tiny_prior(channels: int, dtype=torch.float32, seed: int = 0) -> DiffusionPrior:
    torch.manual_seed(seed)
    unet = UNet2DModel(**tiny_unet_config(channels)).to(dtype).eval().requires_grad_(False)
    return DiffusionPrior(unet)


@pytest.fixture(scope="module")
def priors():
    """A float32 tiny prior per channel count (1 gray, 2 MRI, 3 RGB)."""
    return {c: tiny_prior(c) for c in (1, 2, 3)}


def images(op, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *op.image_shape, generator=g, dtype=dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(-10 * torch.log10((x.double() - ref.double()).pow(2).mean()))


# ---- the prior-space map -------------------------------------------------------------------
@pytest.mark.parametrize("case", list(OPS))
def test_prior_space_map_is_exact(ops, case):
    op, space = ops[case], PriorSpace()
    x = images(op, dtype=F64)
    y = op.A(x)
    x_model = space.to_model(x)
    assert torch.allclose(x_model, 2 * x - 1, rtol=0, atol=0)
    assert relative_error(op.A(x_model), space.measurement_to_model(y, op)) < 1e-12
    assert relative_error(space.to_image(x_model), x) < 1e-15
    assert relative_error(space.measurement_to_image(space.measurement_to_model(y, op), op), y) < 1e-12


# ---- DDNM is the IDM core's step ------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 4])
def test_ddnm_with_eta_0_equals_the_idm_core(ops, steps):
    op = ops["cs"]
    prior = tiny_prior(1, dtype=F64)
    model = IDM(
        IDMConfig(invertible="none", injectors=False, schedule="ddpm", time_input=True, init="noise", steps=steps),
        unet=copy.deepcopy(prior.unet),
    ).double()
    y = op.A(images(op, dtype=F64))
    x_hat = DDNM(prior, steps=steps, eta=0.0, progress=False)(y, op, generator=gen(7))
    with torch.no_grad():
        y_model = prior.space.measurement_to_model(y, op)
        expected = prior.space.to_image(model(y_model, op, generator=gen(7)))
    assert x_hat.shape == expected.shape == (2, 1, *SIZE)
    assert relative_error(x_hat, expected) < 1e-12


@pytest.mark.parametrize("case", EXACT)
@pytest.mark.parametrize("eta", [0.0, 0.85])
def test_ddnm_result_is_consistent_with_the_measurements(ops, priors, case, eta):
    op = ops[case]
    y = op.A(images(op))
    x_hat = DDNM(priors[op.channels], steps=3, eta=eta, progress=False)(y, op, generator=gen(0))
    # The last step has abar_prev = 1 and returns the projected x0: A x_hat = y up to float32 rounding.
    assert relative_error(op.A(x_hat), y) < 1e-5


def test_exact_pinv_is_declared_by_every_operator(ops):
    assert [case for case, op in ops.items() if op.exact_pinv] == EXACT  # ct's FBP is approximate


def test_ddnm_projects_with_least_squares_where_the_pinv_is_approximate(ops, priors):
    ct, cs = ops["ct"], ops["cs"]
    assert DDNM(priors[1]).projection_operator(cs) is cs  # auto: an exact A_dagger is kept
    assert DDNM(priors[1], pinv="operator").projection_operator(ct) is ct
    lsq = DDNM(priors[1], lsq_iters=50).projection_operator(ct)
    y = ct.A(images(ct))
    # least squares fits the sinogram far better than FBP does, and the result of DDNM with it too
    assert relative_error(ct.A(lsq.A_dagger(y)), y) < 0.1 * relative_error(ct.A(ct.A_dagger(y)), y)
    solved = DDNM(priors[1], steps=3, lsq_iters=50, progress=False)(y, ct, generator=gen(0))
    as_is = DDNM(priors[1], steps=3, pinv="operator", progress=False)(y, ct, generator=gen(0))
    assert relative_error(ct.A(solved), y) < 0.1 * relative_error(ct.A(as_is), y)
    with pytest.raises(ValueError, match="pinv"):
        DDNM(priors[1], pinv="fbp")
    with pytest.raises(ValueError, match="lsq_iters"):
        DDNM(priors[1], lsq_iters=0)


def test_ddnm_options(ops, priors):
    op = ops["inpainting"]
    y = op.A(images(op))
    base = DDNM(priors[1], steps=3, progress=False)
    clipped = DDNM(priors[1], steps=3, clip_x0=True, clamp_output=True, progress=False)
    assert base.nfe == 3 and base.timesteps == [666, 333, 0]
    a, b = base(y, op, generator=gen(0)), clipped(y, op, generator=gen(0))
    assert b.min() >= 0 and b.max() <= 1 and not torch.equal(a, b)
    with pytest.raises(ValueError, match="eta"):
        DDNM(priors[1], eta=1.5)
    with pytest.raises(ValueError, match="prior"):
        DDNM(None)


# ---- every method, every operator -------------------------------------------------------------
def _methods(prior):
    return [
        PseudoInverse(),
        TV(iters=5, progress=False),
        DDNM(prior, steps=3, progress=False),
        DPS(prior, zeta=0.3, steps=3, progress=False),
    ]


@pytest.mark.parametrize("case", list(OPS))
def test_every_method_runs_and_is_deterministic(ops, priors, case):
    op = ops[case]
    y = op.A(images(op))
    for method in _methods(priors[op.channels]):
        first = method(y, op, generator=gen(3))
        assert first.shape == (2, *op.image_shape), method.name
        assert torch.isfinite(first).all(), method.name
        assert torch.equal(first, method(y, op, generator=gen(3))), method.name
        if method.nfe > 0:  # the diffusion samplers draw from the generator, and only from it
            assert not torch.equal(first, method(y, op, generator=gen(4))), method.name
            torch.manual_seed(123)
            state = torch.get_rng_state()
            method(y, op, generator=gen(3))
            assert torch.equal(state, torch.get_rng_state()), f"{method.name} touched the global RNG"


# ---- TV ---------------------------------------------------------------------------------------
def rectangles(size: int = 32) -> torch.Tensor:
    x = torch.full((1, 1, size, size), 0.1)
    x[..., 4:14, 3:20] = 0.8
    x[..., 17:29, 10:26] = 0.4
    x[..., 2:11, 22:30] = 1.0
    x[..., 20:26, 2:8] = 0.6
    return x


# Gains measured with the task defaults (lam 0.002, 800 iterations): 12.8 dB (inpainting,
# pinv 9.5 -> TV 22.3) and 20.1 dB (cs, 9.4 -> 29.5); asserted with 1.8-2.1 dB of slack.
@pytest.mark.parametrize(
    "name, kwargs, margin",
    [
        ("inpainting", dict(mask="random", ratio=0.5, seed=0), 11.0),
        ("cs", dict(ratio=0.3, block=8, mode="spatial"), 18.0),
    ],
)
def test_tv_beats_pinv_on_piecewise_constant_images(name, kwargs, margin):
    x = rectangles()
    op = operators.make(name, img_size=(32, 32), channels=1, **kwargs)
    y = op.A(x)
    gain = psnr(TV(progress=False)(y, op), x) - psnr(PseudoInverse()(y, op), x)
    assert gain > margin


def test_tv_settings_and_tuning(ops):
    op = ops["inpainting"]
    tv = TV(progress=False)
    lam, iters = tv.settings(op)
    assert lam > 0 and iters >= 1
    assert TV(lam=0.5, iters=7).settings(op) == (0.5, 7)
    x = rectangles(16)
    best, scores = tune_tv_weight(op, x, grid=(0.001, 0.05), iters=20, progress=False, return_scores=True)
    assert best in (0.001, 0.05) and set(scores) == {0.001, 0.05}
    assert best == tune_tv_weight(op, x, grid=(0.001, 0.05), iters=20, progress=False)
    with pytest.raises(ValueError, match="stepsize"):
        TV(stepsize=2.5)


# ---- DPS --------------------------------------------------------------------------------------
def test_dps_guidance_is_the_gradient_of_the_norm_not_its_square(ops):
    op = ops["inpainting"]
    g = gen(0)
    x_t = torch.randn(2, *op.image_shape, generator=g, dtype=F64)
    y = op.A(torch.randn(2, *op.image_shape, generator=g, dtype=F64))
    abar = torch.tensor(0.3, dtype=F64)
    zero_eps = lambda x, t: torch.zeros_like(x)  # x0_hat = x_t / sqrt(abar)
    grad, x0, norms = dps_guidance(x_t, 500, zero_eps, abar, y, op, clip_x0=False)
    residual = op.A(x_t / abar.sqrt()) - y
    per_image = residual.flatten(1).norm(dim=1)
    expected = op.A_adjoint(residual) / (per_image.view(-1, 1, 1, 1) * abar.sqrt())
    assert relative_error(grad, expected) < 1e-12
    assert relative_error(norms, per_image) < 1e-12
    squared = 2 * op.A_adjoint(residual) / abar.sqrt()
    assert relative_error(grad, squared) > 0.5
    # The norm's gradient does not grow with the residual (the square's would grow 10x).
    grad_far, _, _ = dps_guidance(10 * x_t, 500, zero_eps, abar, 10 * y, op, clip_x0=False)
    assert relative_error(grad_far, grad) < 1e-12


def test_dps_step_is_ddpm_posterior_minus_zeta_times_guidance(ops):
    op = ops["cs"]
    g = gen(1)
    x_t = torch.randn(1, *op.image_shape, generator=g, dtype=F64)
    y = op.A(torch.rand(1, *op.image_shape, generator=g, dtype=F64) * 2 - 1)
    z = torch.randn(1, *op.image_shape, generator=g, dtype=F64)
    table = ddpm_alphas_cumprod()
    t = 400
    a, a_prev = table[t], table[t - 1]
    eps_fn = lambda x, _t: 0.5 * torch.tanh(x)
    x_prev, x0 = dps_step(x_t, t, eps_fn, a, a_prev, y, op, zeta=0.7, noise=z)
    grad, x0_ref, _ = dps_guidance(x_t, t, eps_fn, a, y, op, clip_x0=True)
    beta = 1 - a / a_prev
    mean = beta * a_prev.sqrt() / (1 - a) * x0_ref + (1 - a_prev) * (1 - beta).sqrt() / (1 - a) * x_t
    std = (beta * (1 - a_prev) / (1 - a)).sqrt()
    assert torch.equal(x0, x0_ref) and x0.abs().max() <= 1
    assert relative_error(x_prev, mean + std * z - 0.7 * grad) < 1e-12
    # last step: abar_prev = 1, posterior mean = x0_hat, no noise
    last, _ = dps_step(x_t, 0, eps_fn, table[0], torch.tensor(1.0, dtype=F64), y, op, zeta=0.7)
    grad0, x00, _ = dps_guidance(x_t, 0, eps_fn, table[0], y, op)
    assert relative_error(last, x00 - 0.7 * grad0) < 1e-12


def test_dps_guidance_matches_deepinv_dps_data_fidelity(ops):
    from deepinv.sampling import DPSDataFidelity

    op = ops["inpainting"]
    g = gen(2)
    x_t = torch.randn(2, *op.image_shape, generator=g)
    y = op.A(torch.rand(2, *op.image_shape, generator=g) * 2 - 1)
    abar = torch.tensor(0.6)
    s, sigma = abar.sqrt(), ((1 - abar) / abar).sqrt()
    eps_fn = lambda x, _t: 0.5 * torch.tanh(x) + 0.1 * x
    # deepinv's denoiser D(x, sigma) works on the variance-exploding x = x_t / sqrt(abar).
    denoiser = lambda x_ve, sig: x_ve - sig * eps_fn(x_ve * s, None)
    fidelity = DPSDataFidelity(denoiser=denoiser, clip=(-1.0, 1.0), guidance="norm")
    grad_ve = fidelity.grad(x_t / s, y, physics=op, sigma=sigma)
    grad, _, _ = dps_guidance(x_t, 0, eps_fn, abar, y, op, clip_x0=True)
    assert relative_error(grad, grad_ve / s) < 1e-5


def test_size_scaled_dps_step_moves_each_pixel_as_far_at_every_image_size():
    """A 2x2-tiled image under a 2x2-tiled mask: the scaled step moves every pixel the same."""

    class Masking:  # y = mask * x, enough for the guidance
        def __init__(self, mask):
            self.mask = mask

        def A(self, x):
            return self.mask * x

    g = gen(4)
    mask = (torch.rand(1, 3, 16, 16, generator=g) < 0.5).to(F64)
    x_t = torch.randn(1, 3, 16, 16, generator=g, dtype=F64)
    y = Masking(mask).A(torch.rand(1, 3, 16, 16, generator=g, dtype=F64) * 2 - 1)
    tile = lambda v: v.repeat(1, 1, 2, 2)
    eps_fn = lambda x, _t: 0.5 * torch.tanh(x)  # acts pixel by pixel, like tiling
    abar = torch.tensor(0.6, dtype=F64)
    small, _, _ = dps_guidance(x_t, 0, eps_fn, abar, y, Masking(mask))
    large, _, _ = dps_guidance(tile(x_t), 0, eps_fn, abar, tile(y), Masking(tile(mask)))
    # the norm's gradient is spread over 4x the pixels: each gets half of it
    assert relative_error(large, tile(small) / 2) < 1e-12
    step_small, step_large = size_scaled_step(0.5, (3, 16, 16)), size_scaled_step(0.5, (3, 32, 32))
    assert relative_error(step_large * large, tile(step_small * small)) < 1e-12
    assert size_scaled_step(0.5, (3, 256, 256)) == 0.5  # the authors' value at the authors' size
    assert size_scaled_step(1.0, (1, 64, 64)) == pytest.approx((4096 / 196608) ** 0.5)


def test_dps_applies_the_size_scaled_step(ops, priors, monkeypatch):
    import benchmarks.dps as dps_module

    seen = []
    real_step = dps_module.dps_step
    monkeypatch.setattr(dps_module, "dps_step", lambda *a, **k: seen.append(a[7]) or real_step(*a, **k))
    op = ops["inpainting"]
    y = op.A(images(op, batch=1))
    DPS(priors[1], zeta=0.5, steps=2, progress=False)(y, op, generator=gen(0))
    DPS(priors[1], zeta=0.5, steps=2, progress=False, scale_with_size=False)(y, op, generator=gen(0))
    assert seen[:2] == [size_scaled_step(0.5, (1, *SIZE))] * 2 and seen[2:] == [0.5, 0.5]


def test_dps_clamps_x0_to_the_images_range_mapped_to_the_prior_space(ops, priors, monkeypatch):
    """(0, 1) images clamp x0_hat to [-1, 1] in the prior's space (the authors'); the signed (-1, 1) range of MRI's
    real and imaginary parts with a phase to [-3, 1], so their negative halves are not cut away."""
    import benchmarks.dps as dps_module

    op = ops["mri"]
    g = gen(5)
    x_t = 3 * torch.randn(1, *op.image_shape, generator=g, dtype=F64)
    y = op.A(torch.rand(1, *op.image_shape, generator=g, dtype=F64))
    abar = torch.tensor(0.6, dtype=F64)
    eps_fn = lambda x, _t: 0.1 * x
    _, x0_image, _ = dps_guidance(x_t, 0, eps_fn, abar, y, op, clip_x0=True)
    _, x0_signed, _ = dps_guidance(x_t, 0, eps_fn, abar, y, op, clip_x0=True, clip_bounds=(-3.0, 1.0))
    _, x0_free, _ = dps_guidance(x_t, 0, eps_fn, abar, y, op, clip_x0=False)
    assert x0_free.min() < -3 and x0_free.max() > 1  # the draw reaches past both bounds
    assert torch.equal(x0_image, x0_free.clamp(-1, 1)) and torch.equal(x0_signed, x0_free.clamp(-3, 1))

    seen = []
    real_step = dps_module.dps_step
    monkeypatch.setattr(dps_module, "dps_step", lambda *a, **k: seen.append(k["clip_bounds"]) or real_step(*a, **k))
    y = op.A(images(op, batch=1))
    DPS(priors[2], zeta=0.5, steps=1, progress=False)(y, op, generator=gen(0))
    DPS(priors[2], zeta=0.5, steps=1, progress=False, clip_range=dps_module.SIGNED_RANGE)(y, op, generator=gen(0))
    assert seen == [(-1.0, 1.0), (-3.0, 1.0)]
    for bad in ((1.0, 0.0), (0.0, float("nan"))):
        with pytest.raises(ValueError, match="clip_range must be two finite numbers"):
            DPS(priors[1], zeta=0.5, clip_range=bad)


def test_dps_step_size_and_schedule(ops, priors):
    assert dps_timesteps(1000) == list(range(999, -1, -1))
    assert dps_timesteps(4) == [999, 666, 333, 0]
    dps = DPS(priors[1], steps=3, progress=False)
    assert dps.nfe == 3
    assert dps.step_size(ops["inpainting"]) == 0.5
    with pytest.raises(ValueError, match="tune_dps_step"):
        dps.step_size(ops["cs"])
    assert DPS(priors[1], zeta=0.2, steps=3).step_size(ops["cs"]) == 0.2


def test_tune_dps_step_picks_from_the_grid_deterministically(ops, priors):
    op = ops["cs"]
    x = images(op)
    grid = (0.05, 1.0, 20.0)
    best, scores = tune_dps_step(priors[1], op, x, grid=grid, steps=3, progress=False, return_scores=True)
    assert best in grid and set(scores) == set(grid)
    assert scores[best] == max(scores.values())
    assert tune_dps_step(priors[1], op, x, grid=grid, steps=3, progress=False) == best


# ---- prior loading ------------------------------------------------------------------------------
def test_load_prior_folder(tmp_path, ops):
    prior = tiny_prior(1)
    prior.unet.save_pretrained(tmp_path / "prior")
    loaded = load_prior(tmp_path / "prior")
    x = torch.randn(1, 1, *SIZE)
    loaded_weights = dict(loaded.unet.named_parameters())
    assert all(torch.equal(loaded_weights[n], p) for n, p in prior.unet.named_parameters())
    # same weights; oneDNN may pick other kernels for differently allocated (memory-mapped) tensors
    assert torch.allclose(loaded.eps(x, 10), prior.eps(x, 10), rtol=1e-5, atol=1e-6)
    assert loaded.channels == 1 and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(PriorError, match="does not exist"):
        load_prior(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PriorError, match="config.json"):
        load_prior(tmp_path / "empty")
    (tmp_path / "prior" / "scheduler").mkdir()
    (tmp_path / "prior" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear"})
    )
    with pytest.raises(PriorError, match="beta_start"):
        load_prior(tmp_path / "prior")
    with pytest.raises(PriorError, match="2-channel images"):  # RGB images are not groups of 2 channels
        DDNM(tiny_prior(2), steps=2, progress=False)(ops["cs-rgb"].A(torch.rand(1, 3, *SIZE)), ops["cs-rgb"])


def test_loaded_prior_works_in_the_value_range_its_folder_records(tmp_path):
    """The baselines map images to the range the prior was trained on, as IDM models built on it do."""
    from idm.unets.factory import PRIOR_INFO_NAME

    folder = tmp_path / "prior"
    tiny_prior(1).unet.save_pretrained(folder)
    assert load_prior(folder).space == PriorSpace(2.0, -1.0)  # no record: diffusers' [-1, 1]
    for data_range, space in [([0, 1], PriorSpace(1.0, 0.0)), ([-1, 1], PriorSpace(2.0, -1.0))]:
        (folder / PRIOR_INFO_NAME).write_text(json.dumps({"format": "idm-prior", "data_range": data_range}))
        assert load_prior(folder).space == space
        expected = "unit" if data_range == [0, 1] else "symmetric"
        assert IDM(IDMConfig(unet=str(folder), steps=1)).config.prior_range == expected
    (folder / PRIOR_INFO_NAME).write_text(json.dumps({"format": "idm-prior", "data_range": [1, 1]}))
    with pytest.raises(PriorError, match="empty data_range"):
        load_prior(folder)


def test_prior_pads_odd_sizes():
    prior = tiny_prior(1)
    out = prior.eps(torch.randn(1, 1, 15, 13), 5)
    assert out.shape == (1, 1, 15, 13) and torch.isfinite(out).all()


def test_a_grey_prior_models_complex_and_rgb_images_channel_by_channel(ops, priors):
    grey = priors[1]
    x = torch.randn(2, 3, 16, 16)
    together = grey.eps(x, 7)
    alone = torch.cat([grey.eps(x[:, c : c + 1], 7) for c in range(3)], dim=1)
    assert together.shape == x.shape and torch.allclose(together, alone, atol=1e-5)
    grey.check_images((1, 2, 16, 16))  # complex MRI images: real and imaginary parts
    with pytest.raises(PriorError, match="2-channel images .or groups of them."):
        priors[2].check_images((1, 3, 16, 16))
    mri = ops["mri"]  # DDNM on complex MRI images with the grey prior
    out = DDNM(grey, steps=3, progress=False)(mri.A(images(mri)), mri, generator=gen(0))
    assert out.shape == (2, *mri.image_shape) and torch.isfinite(out).all()


# ---- the factory ------------------------------------------------------------------------------------
def test_make_method_and_available_methods(ops, priors):
    assert available_methods() == ["pinv", "tv", "ddnm", "dps"]
    assert [needs_prior(n) for n in available_methods()] == [False, False, True, True]
    built = {n: make_method(n, prior=priors[1], progress=False) for n in available_methods()}
    assert {n: m.name for n, m in built.items()} == {n: n for n in available_methods()}
    assert [built[n].nfe for n in available_methods()] == [0, 0, 100, 1000]
    assert make_method("ddnm", priors[1], steps=5).nfe == 5
    with pytest.raises(ValueError, match="needs a diffusion prior"):
        make_method("dps")
    with pytest.raises(ValueError, match="unknown method"):
        make_method("ddrm")

    class Custom:  # e.g. the harness's IDM wrapper
        name, nfe = "idm", 3

        def __call__(self, y, op, generator=None):
            return op.A_dagger(y)

    custom = Custom()
    assert make_method(custom) is custom and check_method(custom) is custom
    with pytest.raises(TypeError, match="nfe"):
        make_method(lambda y, op, generator=None: y)


def test_prior_abar_table():
    prior, like = tiny_prior(1), torch.zeros(1)
    assert prior.abar(-1, like).item() == 1.0 and prior.abar(0, like).dtype == torch.float32
    assert prior.abar(999, like.double()).item() == prior.alphas_cumprod[999].item()
    prior.abar(5, like)
    assert sorted(str(dtype) for _, dtype in prior._abar_tables) == ["torch.float32", "torch.float64"]  # one table each
    with pytest.raises(ValueError, match=r"timestep must be in \[-1, 999\], got -2"):
        prior.abar(-2, like)


@pytest.mark.parametrize("case", ["cs", "mri"])
def test_diffusion_baselines_read_back_a_fixed_number_of_values_whatever_the_steps(ops, priors, case):
    """DDNM and DPS check their measurements once; their steps' operator calls read nothing back (no host sync)."""
    op = ops[case]
    y = op.A(images(op))
    counts = {}
    for steps in (2, 5):
        for method in (DDNM(priors[op.channels], steps=steps, progress=False), DPS(priors[op.channels], zeta=1.0, steps=steps, progress=False)):
            counts[method.name, steps] = host_reads(lambda: method(y, op, generator=gen(0)))
    assert set(counts.values()) == {2}  # y's NaN check and the all-ones image's (A 1 maps y to the prior's range)
    y_nan = y.clone()
    y_nan.view(-1)[0] = float("nan")
    with pytest.raises(operators.OperatorInputError, match="y contains NaN"):
        DPS(priors[op.channels], zeta=1.0, steps=2, progress=False)(y_nan, op)


def test_tune_dps_command_records_the_choice(tmp_path):
    from diffusers import UNet2DModel

    from benchmarks import tune_dps
    from idm.pretrain import PriorArchitecture
    from tests.test_train import write_images

    torch.manual_seed(0)
    prior = tmp_path / "prior"
    UNet2DModel(**PriorArchitecture(channels=1, width=8, levels=2, layers_per_block=1, attention=False).unet_config()).save_pretrained(prior)
    data = write_images(tmp_path / "train", n=3, size=24)
    out = tmp_path / "zeta.json"
    assert tune_dps.main(["--task", "cs", "--ratio", "0.25", "--block", "8", "--prior", str(prior), "--data", str(data),
                          "--crop", "16", "--images", "2", "--steps", "2", "--grid", "0.1", "0.5", "--device", "cpu",
                          "--out", str(out)]) == 0  # fmt: skip
    record = json.loads(out.read_text())
    assert record["zeta"] in (0.1, 0.5) and set(record["mean_psnr_by_zeta"]) == {"0.1", "0.5"}
    assert record["operator"]["ratio"] == 0.25 and len(record["images"]) == 2 and record["steps"] == 2
