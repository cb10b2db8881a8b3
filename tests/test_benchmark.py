"""``idm benchmark`` and its harness on tiny models and two small images."""

from __future__ import annotations

import csv
import json
import math
import time
import warnings

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from benchmarks.harness import BenchmarkImage, run_benchmark
from idm import IDM, IDMConfig
from idm.cli import main
from idm.unets import PRIOR_INFO_NAME, tiny_unet_config


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    """Two 32x32 gray PNGs, a tiny [-1, 1] prior and a tiny IDM model folder built on it."""
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for name in ("a", "b"):
        pixels = (rng.random((32, 32)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
    torch.manual_seed(0)
    UNet2DModel(**tiny_unet_config(1)).save_pretrained(root / "prior")
    (root / "prior" / PRIOR_INFO_NAME).write_text(json.dumps({"format": "idm-prior", "data_range": [-1, 1]}))
    IDM(IDMConfig(unet=str(root / "prior"), steps=2)).save_pretrained(root / "idm")
    return root


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_every_method_runs_and_writes_the_files(bench_files, tmp_path):
    out = tmp_path / "out"
    status = main([
        "benchmark", "--task", "cs", "--ratio", "0.25", "--block", "8", "--data", str(bench_files / "images"),
        "--methods", "idm,pinv,tv,ddnm,dps", "--checkpoint", str(bench_files / "idm"),
        "--ddnm-steps", "3", "--dps-steps", "3", "--dps-zeta", "0.3",
        "--device", "cpu", "--seed", "3", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    assert status == 0
    rows = _rows(out / "results.csv")
    from benchmarks import resident_memory

    memory = ["peak_mem_mb"] if resident_memory.available() else []  # the CPU's column where Linux can measure it
    assert list(rows[0]) == ["method", "image", "psnr", "ssim", "seconds", "nfe", *memory, "status", "error"]
    assert [(r["method"], r["image"]) for r in rows] == [(m, i) for i in "ab" for m in ("idm", "pinv", "tv", "ddnm", "dps")]
    assert all(r["status"] == "ok" and float(r["seconds"]) > 0 for r in rows)
    assert {r["method"]: int(r["nfe"]) for r in rows} == {"idm": 2, "pinv": 0, "tv": 0, "ddnm": 3, "dps": 3}
    summary = (out / "summary.md").read_text()
    for name in ("idm", "pinv", "tv", "ddnm", "dps"):
        assert f"| `{name}` |" in summary
    assert "DPS step size 0.3" in summary
    settings = json.loads((out / "benchmark.json").read_text())
    assert settings["prior"] == str(bench_files / "prior") and settings["images"] == ["a", "b"]
    assert (out / "grids" / "a.png").is_file() and (out / "recon" / "dps" / "b.png").is_file()
    assert Image.open(out / "tradeoff.png").size[0] > 500  # quality against time, per method
    # a rerun with the same seed gives the same numbers
    assert main([
        "benchmark", "--task", "cs", "--ratio", "0.25", "--block", "8", "--data", str(bench_files / "images"),
        "--methods", "idm,ddnm", "--checkpoint", str(bench_files / "idm"), "--ddnm-steps", "3",
        "--device", "cpu", "--seed", "3", "--no-progress", "--no-images", "--out", str(tmp_path / "again"),
    ]) == 0  # fmt: skip
    again = {(r["method"], r["image"]): r["psnr"] for r in _rows(tmp_path / "again" / "results.csv")}
    assert all(again[(r["method"], r["image"])] == r["psnr"] for r in rows if r["method"] in ("idm", "ddnm"))


def test_idm_ensembles_run_as_methods_of_their_own(bench_files, tmp_path):
    out = tmp_path / "out"
    assert main([
        "benchmark", "--task", "cs", "--ratio", "0.25", "--block", "8", "--data", str(bench_files / "images"),
        "--methods", "idm", "--ensemble", "1", "8", "--checkpoint", str(bench_files / "idm"),
        "--device", "cpu", "--no-progress", "--out", str(out),
    ]) == 0  # fmt: skip
    rows = _rows(out / "results.csv")
    assert [(r["method"], r["image"], int(r["nfe"])) for r in rows] == [
        (m, i, n) for i in "ab" for m, n in (("idm", 2), ("idm-x8", 16))]  # fmt: skip
    assert rows[0]["psnr"] != rows[1]["psnr"] and (out / "recon" / "idm-x8" / "a.png").is_file()
    settings = json.loads((out / "benchmark.json").read_text())
    assert settings["methods"] == ["idm", "idm-x8"] and settings["idm_ensembles"] == [1, 8]
    from benchmarks.tradeoff import _method_settings

    assert _method_settings(settings, "idm-x8") == _method_settings(settings, "idm")  # one checkpoint and precision
    with pytest.raises(SystemExit):  # not a subgroup of the flips and turns
        main(["benchmark", "--task", "cs", "--data", str(bench_files / "images"), "--ensemble", "3", "--out", str(tmp_path / "x")])


def test_each_ensemble_member_is_scored_alone_and_the_upright_one_is_plain_idm(bench_files, tmp_path):
    """Measured as idm benchmark measures (the operator flags, an image padded to the CS block, the generator of
    its index, for a model that starts from noise), the upright member is plain IDM."""
    import shutil

    from benchmarks import ensemble_members

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(bench_files / "images" / "a.png", images / "a.png")
    Image.fromarray((np.random.default_rng(1).random((40, 36)) * 255).astype(np.uint8)).save(images / "c.png")
    torch.manual_seed(0)
    IDM(IDMConfig(unet=str(bench_files / "prior"), steps=2, init="noise")).save_pretrained(tmp_path / "noise-idm")
    common = ["--checkpoint", str(tmp_path / "noise-idm"), "--task", "cs", "--ratio", "0.5", "--data", str(images),
              "--device", "cpu", "--seed", "2"]  # fmt: skip
    bench = tmp_path / "bench"
    assert main(["benchmark", *common, "--methods", "idm", "--no-progress", "--no-images", "--out", str(bench)]) == 0
    out = tmp_path / "members"
    assert ensemble_members.main([*common, "--out", str(out)]) == 0
    rows = _rows(out / "members.csv")
    assert [(r["image"], r["symmetry"]) for r in rows] == [(i, s) for i in "ac" for s in (
        "identity", "flip", "180 degree turn", "180 degree turn + flip", "90 degree turn", "90 degree turn + flip",
        "270 degree turn", "270 degree turn + flip")]  # fmt: skip
    plain = {r["image"]: float(r["psnr"]) for r in _rows(bench / "results.csv")}
    assert all(abs(float(r["psnr"]) - plain[r["image"]]) < 1e-3 for r in rows if r["symmetry"] == "identity")
    assert len({r["psnr"] for r in rows if r["image"] == "a"}) > 1  # a random network is not equivariant
    assert "| 90 degree turn |" in (out / "members.md").read_text()
    assert ensemble_members.main([*common, "--acceleration", "4", "--out", str(tmp_path / "bad")]) == 2  # not cs's
    assert not (tmp_path / "bad").exists()


def test_the_prior_is_scored_denoising_each_image_as_it_is_and_turned_a_quarter(bench_files, tmp_path, capsys):
    from benchmarks import prior_turns
    from benchmarks.prior import load_prior

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((np.random.default_rng(1).random((24, 40)) * 255).astype(np.uint8)).save(images / "wide.png")
    out = tmp_path / "turns"
    common = ["--prior", str(bench_files / "prior"), "--data", str(images), "--device", "cpu", "--timesteps", "10", "300"]
    assert prior_turns.main([*common, "--out", str(out)]) == 0
    rows = _rows(out / "turns.csv")
    assert [(r["image"], r["timestep"]) for r in rows] == [("wide", "10"), ("wide", "300")]
    assert all(r["psnr_as_is"] != r["psnr_turned"] for r in rows)  # a random U-Net is not equivariant
    assert float(rows[0]["psnr_as_is"]) > float(rows[1]["psnr_as_is"])  # less noise, a better estimate
    assert "| 300 |" in (out / "turns.md").read_text()
    prior = load_prior(bench_files / "prior")  # the estimate is the DDPM one, x0 = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)
    x, eps = torch.rand(1, 1, 16, 24), torch.randn(1, 1, 16, 24)
    abar = prior.abar(300, x)
    x_t = abar.sqrt() * (2 * x - 1) + (1 - abar).sqrt() * eps
    with torch.no_grad():
        expected = (((x_t - (1 - abar).sqrt() * prior.eps(x_t, 300)) / abar.sqrt() + 1) / 2).clamp(0, 1)
        assert torch.allclose(prior_turns.denoised(prior, x, 300, eps, turned=False), expected, atol=1e-6)
    unet = prior.unet
    plain_forward = unet.forward

    def averaged_over_turns(h, t, return_dict=True):  # an exactly turn-equivariant U-Net: both ways alike
        out = sum(torch.rot90(plain_forward(torch.rot90(h, k, (-2, -1)), t).sample, -k, (-2, -1)) for k in range(4)) / 4
        return type("Output", (), {"sample": out})()

    unet.forward = averaged_over_turns
    x, eps = torch.rand(1, 1, 15, 25), torch.randn(1, 1, 15, 25)  # odd sizes: padded before the turn
    with torch.no_grad():
        both_ways = [prior_turns.denoised(prior, x, 300, eps, turned) for turned in (False, True)]
    assert torch.allclose(both_ways[0], both_ways[1], atol=1e-6)
    with pytest.raises(SystemExit):
        prior_turns.main([*common[:-3], "--timesteps", "1000", "--out", str(tmp_path / "bad")])
    assert "--timesteps must be in 0-999" in capsys.readouterr().err


def test_a_failing_method_is_recorded_and_the_run_goes_on(tmp_path):
    class FailsOnSecondImage:
        name, nfe = "flaky", 0

        def __init__(self):
            self.calls = 0

        def __call__(self, y, op, generator=None):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return op.A_dagger(y)

    import operators

    images = [BenchmarkImage(n, torch.rand(1, 16, 16)) for n in ("first", "second", "third")]
    rows = run_benchmark(
        images,
        [FailsOnSecondImage()],
        lambda i, size: operators.make("inpainting", img_size=size, ratio=0.5, seed=i),
        score=lambda x_hat, x: (float(-(x_hat - x).square().mean()), 0.0),
        display=lambda x: x,
        device=torch.device("cpu"),
        out=tmp_path,
        progress=False,
    )
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"] == "RuntimeError: boom"
    assert (tmp_path / "grids" / "third.png").is_file()


@pytest.mark.parametrize("cpu_memory, measure_memory", [(False, True), (True, True), (True, False)])
def test_cheap_methods_run_once_untimed_before_the_first_image(cpu_memory, measure_memory, monkeypatch):
    """Fast methods (warm_up) run once untimed on the first image; where the CPU's memory is measured, they also
    run untimed after every image's timed call (that call measures them), and slow methods are measured by their
    timed call. ``measure_memory=False`` (``idm demo``) measures nothing, and runs nothing twice for it."""
    import operators
    from benchmarks import resident_memory

    if cpu_memory and not resident_memory.available():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    monkeypatch.setattr(resident_memory, "available", lambda: cpu_memory)
    measured = cpu_memory and measure_memory

    class Counted:
        nfe = 0

        def __init__(self, name, warm_up):
            self.name, self.warm_up, self.seen = name, warm_up, []

        def __call__(self, y, op, generator=None):
            self.seen.append(op.seed)
            return op.A_dagger(y)

    images = [BenchmarkImage(n, torch.rand(1, 16, 16)) for n in ("a", "b")]
    cheap, slow = Counted("cheap", True), Counted("slow", False)
    rows = run_benchmark(images, [cheap, slow], lambda i, size: operators.make("inpainting", img_size=size, ratio=0.5, seed=i),
                         score=lambda x_hat, x: (0.0, 0.0), display=lambda x: x, device=torch.device("cpu"), progress=False,
                         measure_memory=measure_memory)  # fmt: skip
    assert cheap.seen == ([0, 0, 0, 1, 1] if measured else [0, 0, 1]) and slow.seen == [0, 1]
    assert [(r["method"], r["image"]) for r in rows] == [("cheap", "a"), ("slow", "a"), ("cheap", "b"), ("slow", "b")]
    assert all((r["peak_mem_mb"] is not None) == measured for r in rows)


def test_measuring_the_cpu_memory_stays_out_of_a_fast_methods_time(monkeypatch):
    """The resident-memory meter (its heap trim and reset) runs outside a fast method's timed call: a meter
    that took 0.3 s would show in the seconds otherwise."""
    import operators
    from benchmarks import resident_memory
    from benchmarks.resident_memory import ResidentPeak

    if not resident_memory.available():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    entered = ResidentPeak.__enter__

    def slow_enter(self):
        time.sleep(0.3)
        return entered(self)

    monkeypatch.setattr(ResidentPeak, "__enter__", slow_enter)

    class Fast:
        name, nfe, warm_up = "fast", 0, True

        def __call__(self, y, op, generator=None):
            return op.A_dagger(y)

    rows = run_benchmark([BenchmarkImage("a", torch.rand(1, 16, 16))], [Fast()],
                         lambda i, size: operators.make("inpainting", img_size=size, ratio=0.5, seed=i),
                         score=lambda x_hat, x: (0.0, 0.0), display=lambda x: x, device=torch.device("cpu"), progress=False)  # fmt: skip
    assert rows[0]["seconds"] < 0.1 and rows[0]["peak_mem_mb"] is not None


def test_a_checkpoint_whose_prior_moved_names_the_missing_folder(bench_files, tmp_path, capsys):
    import shutil

    moved = tmp_path / "idm"
    shutil.copytree(bench_files / "idm", moved)
    config = json.loads((moved / "config.json").read_text())
    config["idm"]["unet"] = str(tmp_path / "gone" / "prior")
    (moved / "config.json").write_text(json.dumps(config))
    argv = ["benchmark", "--task", "cs", "--ratio", "0.25", "--block", "8", "--data", str(bench_files / "images"),
            "--methods", "ddnm", "--checkpoint", str(moved), "--device", "cpu", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert f"the checkpoint's prior {str(tmp_path / 'gone' / 'prior')!r} is not there" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "idm,magic"], "unknown method"),
        (["--methods", "pinv,tv,pinv"], "--methods names a method twice: pinv,tv,pinv"),
        (["--methods", "pinv", "--ensemble", "2"], "--ensemble sets how IDM runs, and --methods does not run idm"),
        (["--methods", "pinv", "--tall"], "--tall sets how IDM runs, and --methods does not run idm"),
        (["--methods", "idm", "--ensemble", "2", "2"], "--ensemble names a size twice: 2 2"),
        (["--methods", "idm"], "needs --checkpoint"),
        (["--methods", "ddnm"], "need a diffusion prior"),
        (["--methods", "pinv", "--views", "60"], "does not use --views"),
        (["--methods", "pinv", "--size", "6"], "--size must be at least 7 (SSIM's 7x7 window), got 6"),
        (["--methods", "dps", "--prior", "prior-natural-y", "--dps-zeta", "no-such-record.json"],
         "DPS step-size record file 'no-such-record.json' does not exist"),
        (["--methods", "pinv", "--tv-lam", "0.01"], "--tv-lam set the tv baseline, which --methods does not run"),
        (["--methods", "pinv", "--ddnm-steps", "3", "--ddnm-eta", "0"], "--ddnm-steps and --ddnm-eta set the ddnm baseline"),
        (["--methods", "pinv,ddnm", "--dps-zeta", "1"], "--dps-zeta set the dps baseline, which --methods does not run"),
        (["--methods", "tv", "--tv-lam", "no-such.json"], "TV weight record file 'no-such.json' does not exist"),
        (["--methods", "tv", "--tv-iters", "0"], "--tv-iters must be >= 1, got 0"),
        (["--methods", "dps", "--prior", "prior-natural-y", "--dps-zeta", "1", "--dps-steps", "-3"], "--dps-steps must be >= 1, got -3"),
    ],
)
def test_bad_arguments_are_clear_errors(bench_files, tmp_path, capsys, argv, message):
    base = ["benchmark", "--task", "cs", "--data", str(bench_files / "images"), "--device", "cpu", "--out", str(tmp_path)]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.shipped
def test_the_checkpoint_sets_the_operator_and_prior_of_baselines_and_tuning_records(bench_files, tmp_path, capsys):
    """Without idm in --methods the checkpoint still gives the baselines its operator and prior; a tuning
    record is checked against the operator that runs (the checkpoint's), not the task's default."""
    argv = ["benchmark", "--task", "cs", "--data", str(bench_files / "images"), "--device", "cpu", "--no-progress", "--no-images"]
    out = tmp_path / "baselines"
    assert main([*argv, "--methods", "pinv,ddnm", "--ddnm-steps", "2", "--checkpoint", str(bench_files / "idm"),
                 "--out", str(out)]) == 0  # fmt: skip
    settings = json.loads((out / "benchmark.json").read_text())
    assert settings["prior"] == str(bench_files / "prior") and settings["checkpoint"] == str(bench_files / "idm")
    record = tmp_path / "zeta.json"
    record.write_text(json.dumps({"task": "cs", "operator": {"name": "cs", "ratio": 0.1}, "zeta": 2.0}))
    assert main([*argv, "--methods", "dps", "--checkpoint", "cs-30", "--dps-zeta", str(record), "--out", str(tmp_path / "z")]) == 2
    assert "tuned with ratio 0.1 (here 0.3)" in capsys.readouterr().err
    record.write_text(json.dumps({"task": "cs", "operator": {"name": "cs", "ratio": 0.3}, "zeta": 2.0,
                                  "prior": "prior-natural-mr"}))  # cs-30's DPS runs prior-natural-y  # fmt: skip
    assert main([*argv, "--methods", "dps", "--checkpoint", "cs-30", "--dps-zeta", str(record), "--out", str(tmp_path / "z")]) == 2
    assert "tuned with the prior 'prior-natural-mr', another network than " in capsys.readouterr().err
    assert main([*argv, "--methods", "pinv", "--checkpoint", "mri-4x", "--out", str(tmp_path / "m")]) == 2  # checked, not ignored
    assert "task" in capsys.readouterr().err


def test_images_of_one_name_in_two_folders_keep_apart(bench_files, tmp_path):
    import shutil

    import tasks
    from benchmarks.harness import load_images

    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        shutil.copy(bench_files / "images" / ("a.png" if folder == "one" else "b.png"), tmp_path / folder / "same.png")
    images = load_images(tasks.get("cs"), [str(tmp_path / "one"), str(tmp_path / "two"), str(bench_files / "images")])
    assert [im.name for im in images] == ["same", "same_2", "a", "b"]
    assert images[0].file.endswith("one/same.png") and images[1].file.endswith("two/same.png")
    assert images[0].sha256 != images[1].sha256 and images[1].sha256 == images[3].sha256  # two/same.png is b.png
    (tmp_path / "three").mkdir()  # a real file named as a made-up name does not collide with it
    shutil.copy(bench_files / "images" / "a.png", tmp_path / "three" / "same_2.png")
    names = [im.name for im in load_images(tasks.get("cs"), [str(tmp_path / d) for d in ("one", "two", "three")])]
    assert names == ["same", "same_3", "same_2"]


PINV_RUN = ["benchmark", "--task", "cs", "--ratio", "0.5", "--block", "8", "--methods", "pinv", "--device", "cpu",
            "--no-progress", "--no-images"]  # fmt: skip


def test_compare_refuses_images_of_one_name_that_differ(bench_files, tmp_path):
    """Runs on other files of the same names, or on one folder's images in another order (another operator draw
    per image), are refused; a run resized to the images' own size is the same problem as one not resized."""
    import shutil

    from benchmarks import compare

    for folder, files in (("x", ("a", "b")), ("y", ("b", "a"))):  # y/a.png holds b.png's pixels
        (tmp_path / folder).mkdir()
        for name, source in zip(("a", "b"), files):
            shutil.copy(bench_files / "images" / f"{source}.png", tmp_path / folder / f"{name}.png")
    for folder in ("x", "y"):
        assert main([*PINV_RUN, "--data", str(tmp_path / folder), "--out", str(tmp_path / f"run-{folder}")]) == 0
    assert main([*PINV_RUN, "--data", str(tmp_path / "x" / "b.png"), str(tmp_path / "x" / "a.png"),
                 "--out", str(tmp_path / "run-swapped")]) == 0  # fmt: skip
    assert main([*PINV_RUN, "--data", str(tmp_path / "x"), "--size", "32", "--out", str(tmp_path / "run-x32")]) == 0
    record = json.loads((tmp_path / "run-x" / "benchmark.json").read_text())
    assert [(i["name"], i["slice"], i["size"], i["operator_seed"]) for i in record["inputs"]] == [("a", 0, [32, 32], 0), ("b", 0, [32, 32], 1)]
    with pytest.raises(ValueError, match=r"did not benchmark the same problem \(image 'a': .*x/a.png .*sha256 [0-9a-f]{12}.* against .*y/a.png"):
        compare.compare_runs(tmp_path / "run-x", tmp_path / "run-y")
    with pytest.raises(ValueError, match=r"image 'a': .*operator seed 0 against .*operator seed 1"):
        compare.compare_runs(tmp_path / "run-x", tmp_path / "run-swapped")
    (row,) = compare.compare_runs(tmp_path / "run-x", tmp_path / "run-x32")
    assert row["images"] == 2 and row["largest_psnr_difference"] == 0.0
    legacy = tmp_path / "run-x-legacy"  # recorded before "(mod 2**32)" and the per-image inputs were written out
    shutil.copytree(tmp_path / "run-x", legacy)
    assert record["operator_seeds"] == "0 + image index (mod 2**32)"
    legacy_record = {key: value for key, value in record.items() if key != "inputs"}
    (legacy / "benchmark.json").write_text(json.dumps({**legacy_record, "operator_seeds": "0 + image index"}))
    (row,) = compare.compare_runs(tmp_path / "run-x", legacy)
    assert row["images"] == 2 and row["largest_psnr_difference"] == 0.0
    (legacy / "benchmark.json").write_text(json.dumps({**legacy_record, "operator_seeds": "1 + image index"}))
    with pytest.raises(ValueError, match=r"operator_seeds: '0 \+ image index \(mod 2\*\*32\)' against '1 \+ image index'"):
        compare.compare_runs(tmp_path / "run-x", legacy)


def test_runs_of_single_images_pool_by_their_images_operator_seeds(bench_files, tmp_path, capsys):
    """A run of one image given the seed of its index in a larger run (--seed) measured it as that run did:
    compared and pooled with it although the runs' base seeds differ; given another seed, it is refused."""
    from benchmarks import compare, tradeoff

    images = bench_files / "images"
    assert main([*PINV_RUN, "--data", str(images), "--out", str(tmp_path / "both")]) == 0  # a: seed 0, b: seed 1
    assert main([*PINV_RUN, "--data", str(images / "a.png"), "--out", str(tmp_path / "a")]) == 0
    assert main([*PINV_RUN, "--data", str(images / "b.png"), "--seed", "1", "--out", str(tmp_path / "b")]) == 0
    assert main([*PINV_RUN, "--data", str(images / "b.png"), "--out", str(tmp_path / "b-seed0")]) == 0
    (row,) = compare.compare_runs(tmp_path / "both", tmp_path / "b")
    assert row["images"] == 1 and row["largest_psnr_difference"] == 0.0 and row["left_out"] == 1
    with pytest.raises(ValueError, match=r"image 'b': .*operator seed 1 against .*operator seed 0"):
        compare.compare_runs(tmp_path / "both", tmp_path / "b-seed0")
    capsys.readouterr()
    assert tradeoff.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "pooled.png")]) == 0
    assert tradeoff.main([str(tmp_path / "both"), "--out", str(tmp_path / "whole.png")]) == 0
    printed = capsys.readouterr().out
    pooled, whole = ((tmp_path / f"{name}.md").read_text().splitlines() for name in ("pooled", "whole"))
    assert pooled[0] == f"`python -m benchmarks.tradeoff {tmp_path / 'a'} {tmp_path / 'b'} --out {tmp_path / 'pooled.png'}`"
    cells = [[cell.strip() for cell in table[-1].split("|")[1:-1]] for table in (pooled, whole)]
    assert cells[0][:3] == cells[1][:3] and cells[0][0] == "`pinv`"  # method, PSNR and SSIM: the same images
    assert cells[0][4] == "0" and cells[0][6] == "2"  # NFEs, images
    assert f"wrote {tmp_path / 'pooled.png'} and {tmp_path / 'pooled.md'}" in printed


def test_a_stopped_benchmark_keeps_its_scores(bench_files, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the first image: its row stays in results.csv (the earlier run's rows are gone), and
    benchmark.json says the run is incomplete, why, and which images it finished (as idm reconstruct does)."""
    import benchmarks.harness

    calls = []

    def stop_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    assert main([*PINV_RUN[:-1], "--data", str(bench_files / "images"), "--out", str(out)]) == 0  # an earlier run
    assert len(_rows(out / "results.csv")) == 2
    monkeypatch.setattr(benchmarks.harness, "save_grid", stop_at_the_second)
    assert main([*PINV_RUN[:-1], "--data", str(bench_files / "images"), "--out", str(out)]) == 130
    assert [(r["method"], r["image"]) for r in _rows(out / "results.csv")] == [("pinv", "a")]
    assert not (out / "grids" / "b.png").exists()  # the earlier run's was removed, this run stopped before its own
    record = json.loads((out / "benchmark.json").read_text())
    assert record["complete"] is False and record["stopped_by"] == "interrupted" and record["images_done"] == ["a"]
    assert record["images"] == ["a", "b"] and record["method_options"] == {}


def test_a_benchmark_where_nothing_could_be_scored_fails(tmp_path, capsys, monkeypatch):
    from benchmarks.pinv import PseudoInverse

    def fails(self, y, op, generator=None):
        raise FloatingPointError("the solver diverged")

    monkeypatch.setattr(PseudoInverse, "__call__", fails)
    (tmp_path / "data").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "data" / "a.png")
    assert main(["benchmark", "--task", "cs", "--data", str(tmp_path / "data"), "--methods", "pinv", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "out")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "1 reconstruction(s) failed" in err and "pinv failed on a: FloatingPointError: the solver diverged" in err
    assert "Traceback" not in err and "tradeoff" not in err  # no method scored: nothing to plot, and nothing more to say
    assert not (tmp_path / "out" / "tradeoff.png").exists()


def test_an_image_too_small_to_score_is_refused_before_any_method_runs(tmp_path, capsys):
    (tmp_path / "tiny").mkdir()
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "tiny" / "a.png")  # below SSIM's 7x7 window
    assert main(["benchmark", "--task", "inpainting", "--data", str(tmp_path / "tiny"), "--methods", "pinv",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "a: the image is 6x6 pixels, too small to score (SSIM's 7x7 window)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tradeoff_points_average_every_method_over_the_images_all_of_them_scored():
    from benchmarks.tradeoff import method_points

    def row(method, image, psnr, seconds=1.0, status="ok", memory=None):
        return dict(method=method, image=image, psnr=psnr, ssim=psnr / 100, seconds=seconds, nfe=3, peak_mem_mb=memory,
                    status=status)  # fmt: skip

    rows = [row("idm", "a", 30, memory=10), row("idm", "b", 32, memory=20), row("idm", "c", 40),
            row("dps", "a", 28, seconds=100), row("dps", "b", 26, seconds=300), row("dps", "c", 0, status="error"),
            row("idm", "a", 99)]  # fmt: skip  (c failed for dps: left out for both; a second idm row of a: ignored)
    idm, dps = method_points(rows)
    assert (idm.method, idm.images, idm.psnr, idm.seconds, idm.peak_mib) == ("idm", 2, 31.0, 1.0, 15.0)
    assert (dps.psnr, dps.seconds, dps.peak_mib) == (27.0, 200.0, None) and dps.psnr_std == pytest.approx(2 ** 0.5)
    assert idm.label() == "idm (3 NFE, 15 MiB)" and dps.label() == "dps (3 NFE)"
    (only,) = method_points(rows, ["dps", "dps"])  # a method named twice is plotted once
    assert only.images == 2
    inexact = [row("idm", "a", math.inf), row("idm", "b", 30), row("dps", "a", 20), row("dps", "b", 22)]
    assert [p.images for p in method_points(inexact)] == [1, 1]  # an exact reconstruction's inf PSNR: left out
    with pytest.raises(ValueError, match="no method to plot"):
        method_points(rows, [])
    with pytest.raises(ValueError, match="idm on a: no seconds or NFEs recorded"):
        method_points([{**row("idm", "a", 30), "seconds": None}])
    with pytest.raises(ValueError, match="no scored image for method\\(s\\) tv \\(scored: idm, dps\\)"):
        method_points(rows, ["idm", "tv"])
    with pytest.raises(ValueError, match="scored no image in common"):
        method_points([row("idm", "a", 30), row("dps", "b", 28)])


def test_tradeoff_plot_merges_runs_of_one_problem_and_refuses_others(bench_files, tmp_path, capsys):
    from benchmarks import tradeoff

    data = str(bench_files / "images")
    assert main([*PINV_RUN, "--data", data, "--out", str(tmp_path / "pinv")]) == 0
    tv_run = [*PINV_RUN, "--data", data, "--out", str(tmp_path / "tv")]
    tv_run[tv_run.index("pinv")] = "tv"
    assert main(tv_run) == 0
    capsys.readouterr()
    assert tradeoff.main([str(tmp_path / "pinv"), str(tmp_path / "tv"), "--out", str(tmp_path / "plot.png")]) == 0
    printed = capsys.readouterr().out
    first = [*PINV_RUN, "--data", str(bench_files / "images" / "a.png"), "--out", str(tmp_path / "pinv-a")]
    assert main(first) == 0  # image a alone: its rows are the first run's, b comes from the second
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one method run alike in both: its images pooled, nothing to say
        assert tradeoff.main([str(tmp_path / "pinv-a"), str(tmp_path / "pinv"), "--out", str(tmp_path / "pooled.png")]) == 0
        assert "(2 images)" in capsys.readouterr().out
        tradeoff.main([str(tmp_path / "pinv"), str(tmp_path / "pinv"), "--out", str(tmp_path / "twice.png")])
    other_tv = [*tv_run[:-1], str(tmp_path / "tv-b"), "--tv-lam", "0.5"]
    other_tv[other_tv.index("--data") + 1] = str(bench_files / "images" / "a.png")
    assert main(other_tv) == 0  # tv on image a with another weight: pooled with the first tv run, it would mix them
    capsys.readouterr()
    assert tradeoff.run_script(tradeoff.main, "benchmarks.tradeoff",
                               [str(tmp_path / "tv-b"), str(tmp_path / "tv"), "--out", str(tmp_path / "x.png")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "tv ran with other settings in" in err and "options: " in err and "plot those runs apart" in err
    record = json.loads((tmp_path / "tv" / "benchmark.json").read_text())
    (tmp_path / "tv" / "benchmark.json").write_text(json.dumps({**record, "hardware": "another CPU"}))
    with pytest.warns(UserWarning, match=r"timed on different hardware \(.*tv: another CPU\)"):
        tradeoff.main([str(tmp_path / "pinv"), str(tmp_path / "tv"), "--out", str(tmp_path / "plot.png")])
    assert "pinv (0 NFE" in printed and "tv (0 NFE" in printed and "(2 images)" in printed
    assert Image.open(tmp_path / "plot.png").size[0] > 500
    other = [*PINV_RUN, "--data", data, "--out", str(tmp_path / "other")]
    other[other.index("0.5")] = "0.25"
    assert main(other) == 0
    capsys.readouterr()
    assert tradeoff.run_script(tradeoff.main, "benchmarks.tradeoff",
                               [str(tmp_path / "pinv"), str(tmp_path / "other"), "--out", str(tmp_path / "x.png")]) == 2  # fmt: skip
    assert "did not benchmark the same problem (operator:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tradeoff.main([str(tmp_path / "pinv"), "--out", str(tmp_path / "plot.pdf")])
    assert "must name a .png file" in capsys.readouterr().err


def test_final_projection_can_be_switched_for_the_benchmark(bench_files, tmp_path):
    argv = ["benchmark", "--task", "cs", "--ratio", "0.25", "--block", "8", "--data", str(bench_files / "images"),
            "--methods", "idm", "--checkpoint", str(bench_files / "idm"), "--device", "cpu", "--no-progress",
            "--no-images"]  # fmt: skip
    psnr = {}
    for flag in ("--no-final-projection", "--final-projection"):
        out = tmp_path / flag
        assert main([*argv, flag, "--out", str(out)]) == 0
        settings = json.loads((out / "benchmark.json").read_text())
        assert settings["idm_final_projection"] is (flag == "--final-projection")
        assert ("projected onto the measurements" in (out / "summary.md").read_text()) is (flag == "--final-projection")
        psnr[flag] = [float(r["psnr"]) for r in _rows(out / "results.csv")]
    assert all(abs(a - b) > 1e-3 for a, b in zip(psnr["--final-projection"], psnr["--no-final-projection"]))


def test_size_resizes_the_test_images(bench_files, tmp_path):
    argv = ["benchmark", "--task", "cs", "--data", str(bench_files / "images"), "--methods", "pinv", "--size", "16",
            "--ratio", "0.5", "--block", "8", "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert Image.open(tmp_path / "recon" / "pinv" / "a.png").size == (16, 16)
    assert json.loads((tmp_path / "benchmark.json").read_text())["resized_to"] == 16
    # anti-aliased: the 16x16 image is close to the 2x2 block means of the 32x32 one, not to a subsampling
    from benchmarks.harness import load_images

    import tasks

    full, small = (load_images(tasks.get("cs"), [str(bench_files / "images")], size=s)[0].x for s in (None, 16))
    means = torch.nn.functional.avg_pool2d(full[None], 2)[0]
    assert (small - means).abs().mean() < 0.5 * (small - full[..., ::2, ::2]).abs().mean()
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(wide / "w.png")
    with pytest.raises(ValueError, match="square images only; w is 16x24"):
        load_images(tasks.get("cs"), [str(wide)], size=8)


def test_dps_step_size_from_a_tuning_record(tmp_path):
    from benchmarks.tune_dps import step_size_from

    record = tmp_path / "zeta.json"
    record.write_text(json.dumps({"task": "mri", "zeta": 2.0,
                                  "operator": {"name": "mri", "acceleration": 4, "center_fraction": 0.08}}))  # fmt: skip
    here = {"name": "mri", "acceleration": 4, "center_fraction": 0.08, "img_size": (32, 32)}
    assert step_size_from("0.7", "mri", here) == 0.7
    assert step_size_from(str(record), "mri", here) == 2.0
    with pytest.raises(ValueError, match="tuned for task 'mri', this benchmark is 'ct'"):
        step_size_from(str(record), "ct", {"name": "ct", "views": 60})
    with pytest.raises(ValueError, match=r"acceleration 4 \(here 8\); pass --dps-zeta 2.0 to use it anyway"):
        step_size_from(str(record), "mri", {**here, "acceleration": 8})
    record.write_text(json.dumps({"task": "mri", "zeta": 2.0, "steps": 1000, "operator": {"name": "mri"}}))
    assert step_size_from(str(record), "mri", here, steps=1000) == 2.0
    with pytest.raises(ValueError, match=r"tuned with steps 1000 \(here 3\); pass --dps-zeta 2.0"):
        step_size_from(str(record), "mri", here, steps=3)  # a step size is tuned for its number of steps
    (tmp_path / "other.json").write_text(json.dumps({"zeta": 1}))
    with pytest.raises(ValueError, match="nor a record of benchmarks.tune_dps"):
        step_size_from(str(tmp_path / "other.json"), "mri", here)


def test_tv_weight_from_a_tuning_record_reaches_the_benchmark(bench_files, tmp_path):
    """``benchmarks.tune_tv`` writes a record; ``idm benchmark --tv-lam`` takes it (or a number) and reports it."""
    from benchmarks import tune_tv

    record = tmp_path / "lam.json"
    assert tune_tv.main(["--task", "cs", "--ratio", "0.25", "--block", "8", "--data", str(bench_files / "images"),
                         "--crop", "16", "--images", "2", "--iters", "5", "--grid", "0.001", "0.05", "--device", "cpu",
                         "--out", str(record)]) == 0  # fmt: skip
    tuned = json.loads(record.read_text())
    assert tuned["lam"] in (0.001, 0.05) and set(tuned["mean_psnr_by_lam"]) == {"0.001", "0.05"}
    assert tuned["task"] == "cs" and tuned["operator"]["ratio"] == 0.25 and tuned["iters"] == 5 and len(tuned["images"]) == 2
    assert 0 < tuned["pinv_mean_psnr"] < max(tuned["mean_psnr_by_lam"].values())  # A^+ y, the level to beat
    argv = ["benchmark", "--task", "cs", "--ratio", "0.25", "--block", "8", "--data", str(bench_files / "images"),
            "--methods", "tv", "--tv-iters", "3", "--device", "cpu", "--no-progress", "--no-images"]  # fmt: skip
    for lam in (str(record), "0.3"):
        out = tmp_path / lam.replace("/", "_")
        assert main([*argv, "--tv-lam", lam, "--out", str(out)]) == 0
        expected = tuned["lam"] if lam.endswith(".json") else 0.3
        assert json.loads((out / "benchmark.json").read_text())["tv_lam_iters"] == [expected, 3]
        assert f"TV weight {expected}, 3 iterations" in (out / "summary.md").read_text()
    with pytest.raises(ValueError, match=r"ratio 0.25 \(here 0.5\); pass --tv-lam"):
        tune_tv.lam_from(str(record), "cs", {"name": "cs", "ratio": 0.5, "block": 8})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--task", "cs", "--ratio", "7"], "ratio must be in (0, 1], got 7.0"),
        (["--task", "cs", "--grid", "0.01", "-1"], "--grid values must be finite and >= 0, got [-1.0]"),
        (["--task", "cs", "--images", "0"], "argument --images: must be at least 1, got 0"),
        (["--task", "cs", "--iters", "0"], "argument --iters: must be at least 1, got 0"),
    ],
)
def test_tune_tv_bad_arguments_are_usage_errors(bench_files, tmp_path, capsys, argv, message):
    from benchmarks import tune_tv

    with pytest.raises(SystemExit) as stopped:
        tune_tv.main([*argv, "--data", str(bench_files / "images"), "--crop", "16", "--out", str(tmp_path / "lam.json")])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "lam.json").exists()


def test_tuning_refuses_an_out_it_could_not_write_before_it_tunes(bench_files, tmp_path, capsys):
    """A tuning run takes minutes to hours: an --out it cannot write is refused before the first candidate."""
    from benchmarks import tune_tv

    (tmp_path / "file").write_text("")
    for out, message in ((tmp_path, "is a folder: give the JSON file to write"), (tmp_path / "file" / "lam.json", "a folder on its path is a file")):
        with pytest.raises(SystemExit) as stopped:
            tune_tv.main(["--task", "cs", "--data", str(bench_files / "images"), "--crop", "16", "--out", str(out)])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "argument --steps: must be at least 1, got 0"),
                                           ([], "is not a diffusers U-Net folder")])  # fmt: skip
def test_tune_dps_bad_arguments_are_usage_errors(bench_files, tmp_path, capsys, argv, message):
    from benchmarks import tune_dps

    with pytest.raises(SystemExit) as stopped:
        tune_dps.main([*argv, "--task", "cs", "--prior", str(tmp_path), "--data", str(bench_files / "images"),
                       "--crop", "16", "--out", str(tmp_path / "zeta.json")])  # fmt: skip
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "zeta.json").exists()


def test_tuning_scores_as_the_benchmark_does():
    """MRI candidates are scored on the clamped magnitude, not on the real and imaginary channels."""
    import tasks
    from benchmarks.protocol import mean_psnr, score_function

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 16, 16, generator=g, dtype=torch.float64)
    x[:, 1] = 0  # magnitude images as (real, 0)
    x_hat = x.clone()
    x_hat[:, 1] = 0.1 * torch.randn(2, 16, 16, generator=g, dtype=torch.float64)  # an imaginary part only
    x_hat[0, 0, 0, 0] = 1.5  # out of range: clamped by the benchmark
    score = score_function(tasks.get("mri"))
    expected = sum(score(x_hat[i : i + 1], x[i : i + 1])[0] for i in range(2)) / 2
    assert mean_psnr(x_hat, x, score) == pytest.approx(expected, abs=1e-9)
    assert abs(mean_psnr(x_hat, x, score) - mean_psnr(x_hat, x)) > 1.0  # raw channels would rank differently
    assert mean_psnr(x_hat.clone().fill_(float("nan")), x, score) == float("-inf")


def test_a_checkpoint_of_another_task_is_refused(bench_files, tmp_path, capsys):
    assert main([
        "train", "--task", "cs", "--unet", "tiny", "--steps", "1", "--data", str(bench_files / "images"),
        "--iters", "1", "--batch-size", "1", "--crop", "16", "--ratio", "0.25", "--block", "8",
        "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run"),
    ]) == 0  # fmt: skip
    argv = ["benchmark", "--task", "inpainting", "--data", str(bench_files / "images"), "--methods", "idm,pinv",
            "--checkpoint", str(tmp_path / "run"), "--device", "cpu", "--out", str(tmp_path / "b")]  # fmt: skip
    assert main(argv) == 2
    assert "trained for 'cs', requested 'inpainting'" in capsys.readouterr().err


def test_ablation_and_scaling_scripts_run_end_to_end(bench_files, tmp_path, capsys):
    from benchmarks import ablation, scaling

    common = ["--task", "cs", "--ratio", "0.25", "--prior", str(bench_files / "prior"),
              "--train-data", str(bench_files / "images"), "--test-data", str(bench_files / "images"),
              "--iters", "1", "--batch-size", "1", "--crop", "16", "--ddnm-steps", "2", "--limit", "1", "--device", "cpu"]  # fmt: skip
    assert ablation.main(common + ["--steps", "1", "--out", str(tmp_path / "ablation")]) == 0
    rows = _rows(tmp_path / "ablation" / "ablation.csv")
    assert [r["variant"] for r in rows] == [v.name for v in ablation.VARIANTS]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert {r["variant"]: r["nfe"] for r in rows}["ddnm"] == "2" and rows[-1]["nfe"] == "1"
    assert "| idm_noise_init |" in (tmp_path / "ablation" / "ablation.md").read_text()
    assert scaling.main(common + ["--sweep", "steps", "--values", "1", "2", "--out", str(tmp_path / "scaling")]) == 0
    rows = _rows(tmp_path / "scaling" / "scaling_steps.csv")
    assert [(r["value"], r["nfe"], r["status"]) for r in rows] == [("1", "1", "ok"), ("2", "2", "ok")]
    assert (tmp_path / "scaling" / "scaling_steps.png").is_file()
    tables = {name: (tmp_path / name / f"{name}{suffix}.csv").read_text()
              for name, suffix in (("ablation", ""), ("scaling", "_steps"))}  # fmt: skip
    for script, argv, name in ((ablation, ["--steps", "1"], "ablation"), (scaling, ["--sweep", "steps", "--values", "2"], "scaling")):
        with pytest.raises(SystemExit) as stopped:  # the earlier runs are there: refused before any work
            script.main(common + argv + ["--out", str(tmp_path / name)])
        assert stopped.value.code == 2
    assert "holds the training runs of steps_2 from an earlier run" in capsys.readouterr().err
    assert tables == {name: (tmp_path / name / f"{name}{suffix}.csv").read_text()
                      for name, suffix in (("ablation", ""), ("scaling", "_steps"))}  # fmt: skip
    for bad, message in ((["--prior", str(tmp_path / "none")], "no such folder, nor a shipped prior's name"),
                         (["--train-data", str(tmp_path / "none")], "no such file or folder"),
                         (["--views", "60"], "task cs does not use --views"),
                         (["--ratio", "2"], r"ratio must be in \(0, 1\], got 2")):  # fmt: skip
        with pytest.raises(ValueError, match=message):  # before any variant trains
            ablation.main(common + bad + ["--out", str(tmp_path / "bad")])
    assert ablation.all_failed_status([{"status": "error"}, {"status": "error"}]) == 1
    assert ablation.all_failed_status([{"status": "error"}, {"status": "ok"}]) == 0


def test_scaling_scores_one_trained_model_at_every_ratio(bench_files, tmp_path, capsys):
    from benchmarks import scaling

    argv = ["--sweep", "ratio", "--values", "0.1", "0.5", "--checkpoint", str(bench_files / "idm"),
            "--test-data", str(bench_files / "images"), "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert scaling.main(argv) == 0
    rows = _rows(tmp_path / "scaling_ratio.csv")
    assert [(r["value"], r["status"], r["iterations"], r["test_images"]) for r in rows] == [
        ("0.1", "ok", "0", "2"), ("0.5", "ok", "0", "2")]
    assert float(rows[1]["psnr"]) > float(rows[0]["psnr"])  # more measurements, closer to the truth
    assert "no training" in (tmp_path / "scaling_ratio.md").read_text()
    with pytest.raises(SystemExit):
        scaling.main(argv + ["--sweep", "steps"])
    assert "--checkpoint scores one model at several ratios" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scaling.main(["--sweep", "ratio", "--values", "0.1", "--test-data", "x", "--out", str(tmp_path)])
    assert "--prior and --train-data are needed" in capsys.readouterr().err
    fixed = tmp_path / "fixed-ratio"  # trained at 25 % only: other ratios are refused, as idm benchmark does
    assert main(["train", "--task", "cs", "--ratio", "0.25", "--block", "8", "--prior", str(bench_files / "prior"), "--steps", "1",
                 "--crop", "16", "--batch-size", "1", "--iters", "1", "--device", "cpu", "--num-workers", "0", "--no-progress",
                 "--data", str(bench_files / "images"), "--out", str(fixed)]) == 0  # fmt: skip
    with pytest.raises(ValueError, match=r"not trained for every ratio asked: 0.5: .*ratio: trained with 0.25, requested 0.5"):
        scaling.main(["--sweep", "ratio", "--values", "0.25", "0.5", "--checkpoint", str(fixed),
                      "--test-data", str(bench_files / "images"), "--device", "cpu", "--out", str(tmp_path / "s")])  # fmt: skip


def test_speed_benchmark_writes_times_and_flops(tmp_path):
    from benchmarks import speed

    out = tmp_path / "speed"
    assert speed.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "1", "2", "--train-batch", "2",
                       "--levers", "base", "channels_last", "--train-levers", "base", "channels_last", "--iters", "1",
                       "--warmup", "0", "--peak-tflops", "1", "--out", str(out)]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(out / "speed.csv")))
    assert [(r["mode"], r["lever"], r["batch"]) for r in rows] == [
        ("inference", "base", "1"), ("inference", "base", "2"), ("inference", "channels_last", "1"),
        ("inference", "channels_last", "2"), ("train", "base", "2"), ("train", "base", "2"),
        ("train", "channels_last", "2"), ("train", "channels_last", "2")]  # fmt: skip
    assert all(r["status"] == "ok" for r in rows)
    assert [r["variant"] for r in rows if r["mode"] == "train"] == ["none", "both"] * 2
    lever_rows = [r for r in rows if r["mode"] == "train" and r["lever"] == "channels_last"]
    assert [r["gflop_per_image"] for r in lever_rows] == [r["gflop_per_image"] for r in rows if r["mode"] == "train"][:2]
    rows = [r for r in rows if r["lever"] == "base" or r["mode"] == "inference"]
    assert all(int(r["page_faults_per_image"]) >= 0 for r in rows if r["mode"] == "inference")  # counted on the CPU
    base = [r for r in rows if r["mode"] == "inference" and r["lever"] == "base"]
    assert base[0]["gflop_per_image"] == base[1]["gflop_per_image"] and float(base[0]["gflop_per_image"]) > 0
    train = {r["variant"]: r for r in rows if r["mode"] == "train"}
    # the memory-saving backward recomputes the forward: more FLOPs per iteration than plain autograd
    assert float(train["both"]["gflop_per_image"]) > float(train["none"]["gflop_per_image"])
    assert all(float(r["percent_of_peak"]) == pytest.approx(100 * float(r["tflops"]), rel=0.01, abs=0.1) for r in train.values())
    assert "python -m benchmarks.speed" in (out / "speed.md").read_text()


def test_speed_benchmark_times_the_ensemble_with_its_copies_stacked_or_one_by_one(tmp_path, capsys):
    from benchmarks import speed

    out = tmp_path / "speed"
    assert speed.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "1", "--ensemble", "4",
                       "--members-per-call", "1", "4", "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(out / "speed.csv")))
    assert [(r["ensemble"], r["members_per_call"], r["status"]) for r in rows] == [("4", "1", "ok"), ("4", "4", "ok")]
    assert rows[0]["gflop_per_image"] == rows[1]["gflop_per_image"]  # the same work, in other batches
    plain = tmp_path / "plain"
    assert speed.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "1", "--iters", "1", "--warmup",
                       "0", "--out", str(plain)]) == 0  # fmt: skip
    (row,) = list(csv.DictReader(open(plain / "speed.csv")))
    assert row["ensemble"] == "" and float(rows[0]["gflop_per_image"]) == pytest.approx(4 * float(row["gflop_per_image"]), rel=0.01)
    assert "members_per_call" not in (plain / "speed.md").read_text()  # shown only where an ensemble ran
    for bad, message in ((["--members-per-call", "2"], "give --ensemble 2, 4 or 8 too"),
                         (["--ensemble", "2", "--levers", "unfolded"], "base and channels_last levers only")):  # fmt: skip
        with pytest.raises(SystemExit):
            speed.main(["--device", "cpu", "--unet", "tiny", *bad, "--out", str(out)])
        assert message in capsys.readouterr().err


def test_speed_benchmark_times_a_checkpoint_on_its_own_operator(tmp_path, capsys):
    """A trained checkpoint is timed with the operator it was trained for (at ``--size``), not block CS."""
    import tasks
    from benchmarks import speed

    folder = tmp_path / "mri-model"
    torch.manual_seed(0)
    IDM(IDMConfig(unet="tiny", image_channels=2, steps=1)).save_pretrained(folder)
    operator = tasks.get("mri").make_operator((16, 16), acceleration=8, center_fraction=0.04).config()
    (folder / "run.json").write_text(json.dumps({"format": "idm-train-run", "identity": {"task": "mri", "operator": operator}}))
    out = tmp_path / "speed"
    assert speed.main(["--device", "cpu", "--checkpoint", str(folder), "--size", "32", "--batch", "1",
                       "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0  # fmt: skip
    (row,) = list(csv.DictReader(open(out / "speed.csv")))
    assert row["status"] == "ok" and row["model"] == "mri-model" and float(row["ms_per_image"]) > 0
    assert row["operator"].split()[0] == "mri" and "acceleration=8" in row["operator"].split()
    op = speed.make_operator(operator, 32, 2)
    assert op.config()["img_size"] == [32, 32] and op.config()["acceleration"] == 8
    with pytest.raises(SystemExit):  # a wrong name: a usage error before any timing, not a traceback
        speed.main(["--device", "cpu", "--checkpoint", str(folder), str(tmp_path / "nope"), "--out", str(out)])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a checkpoint has its own T and is timed in inference only
        speed.main(["--device", "cpu", "--checkpoint", str(folder), "--steps", "2", "--out", str(out)])
    assert "--steps and --train-batch are for --unet architectures" in capsys.readouterr().err


def test_flop_counter_counts_a_sparse_factor_by_its_nonzeros():
    """CT's projector is a sparse matrix: 2 FLOPs per nonzero and column, not those of the dense shape."""
    from benchmarks.speed import count_flops
    from operators.sampling_matrix import SparseMatrix

    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(30, 20, generator=gen) * (torch.rand(30, 20, generator=gen) < 0.1)
    matrix, x = SparseMatrix.from_coo(dense.to_sparse().coalesce()), torch.rand(20, 3, generator=gen)
    nnz = int((dense != 0).sum())
    assert count_flops(lambda: matrix.matmul(x)) == 2 * nnz * 3
    assert count_flops(lambda: matrix.rmatmul(torch.rand(30, 3))) == 2 * nnz * 3
    assert count_flops(lambda: dense @ x) == 2 * 30 * 20 * 3  # dense products as torch counts them
    assert count_flops(lambda: torch.addmm(torch.zeros(30, 3), dense, x)) == 2 * 30 * 20 * 3


def test_ct_projector_benchmark_times_both_projectors(tmp_path):
    from benchmarks import ct_projector

    assert ct_projector.main(["--device", "cpu", "--size", "16", "--views", "4", "--batch", "1", "--iters", "1",
                              "--warmup", "0", "--out", str(tmp_path)]) == 0  # fmt: skip
    record = json.loads((tmp_path / "ct_projector.json").read_text())
    assert [r["projector"] for r in record["rows"]] == ["deepinv grid_sample", "sparse matrix"]
    assert all(r[k] > 0 for r in record["rows"] for k in ("A_ms", "A_adjoint_ms", "pinv_A_train_ms"))
    assert "python -m benchmarks.ct_projector" in (tmp_path / "ct_projector.md").read_text()


def test_ct_start_measures_the_three_ct_settings(bench_files, tmp_path):
    from benchmarks import ct_start

    slices = tmp_path / "ct"
    slices.mkdir()
    np.save(slices / "s.npy", (np.random.default_rng(0).random((16, 16)) * 1400 - 1000).astype(np.int16))
    assert ct_start.main(["--data", str(slices), "--size", "16", "--views", "6", "--prior", str(bench_files / "prior"),
                          "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    record = json.loads((tmp_path / "out" / "ct_start.json").read_text())
    assert record["filters"]["hann"]["norm_I_minus_FBP_A"] < record["filters"]["ramp"]["norm_I_minus_FBP_A"]
    assert set(record["pinv_mapping"]) == {"measurements", "images"} and set(record["alpha_init"]) == {"0.5", "0.99"}
    assert "untrained IDM PSNR" in (tmp_path / "out" / "ct_start.md").read_text()


def test_folded_upsamplers_cost_fewer_flops(tmp_path):
    from benchmarks import speed

    assert speed.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "1", "--levers", "base", "unfolded",
                       "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0  # fmt: skip
    flops = {r["lever"]: float(r["gflop_per_image"]) for r in csv.DictReader(open(tmp_path / "speed.csv"))}
    assert flops["base"] < flops["unfolded"]


def test_cuda_graph_lever_says_it_needs_cuda_on_the_cpu(tmp_path, capsys):
    """Both the speed and the memory benchmark refuse it before any work."""
    from benchmarks import memory, speed

    with pytest.raises(SystemExit):
        speed.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--levers", "cudagraphs", "base", "--out", str(tmp_path)])
    assert "the cudagraphs lever needs a CUDA device (--device cuda)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # for the training rows too, when they run
        speed.main(["--device", "cpu", "--unet", "tiny", "--train-batch", "1", "--train-levers", "cudagraphs", "--out", str(tmp_path)])
    assert "needs a CUDA device" in capsys.readouterr().err
    assert speed.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "1", "--train-levers", "cudagraphs",
                       "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0  # no training rows: nothing to refuse
    assert (tmp_path / "speed.csv").is_file()
    with pytest.raises(SystemExit):
        memory.main(["--device", "cpu", "--cuda-graphs", "--out", str(tmp_path)])
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


def test_summary_means_are_over_the_images_every_method_scored():
    """A method that fails on the hard image is not averaged over the easy one only (it would look better than
    the method that reconstructed both); an exact reconstruction's infinite PSNR leaves its image out too."""
    from benchmarks.report import summary_table

    def row(method, image, psnr, ssim=0.9, status="ok"):
        return dict(method=method, image=image, psnr=psnr, ssim=ssim, seconds=1.0, nfe=3, status=status)

    rows = [row("idm", "easy", 30.0), row("idm", "hard", 20.0), row("ddnm", "easy", 31.0),
            row("ddnm", "hard", math.nan, math.nan, status="error: diverged")]  # fmt: skip
    table = summary_table(rows, ["idm", "ddnm"])
    assert "| `idm` | 30.00 ± 0.00 |" in table and "| `ddnm` | 31.00 ± 0.00 |" in table
    assert "| 1 (1 failed) |" in table and "Means over the 1 of 2 images that every method scored" in table
    rows = [row("pinv", "a", math.inf, 1.0), row("pinv", "b", 40.0), row("idm", "a", 50.0), row("idm", "b", 42.0)]
    table = summary_table(rows, ["pinv", "idm"])
    assert "| `pinv` | 40.00 ± 0.00 | 0.9000 ± 0.0000 |" in table and "| 1 (1 with an infinite PSNR) |" in table
    full = summary_table(rows[1:2] + rows[3:], ["pinv", "idm"])  # every image scored by all: no note
    assert "Means over" not in full and "| `idm` | 42.00 ± 0.00 |" in full
    failed = [row("idm", "a", 30.0), row("idm", "b", 20.0), row("dps", "a", math.nan, math.nan, "error: x"),
              row("dps", "b", math.nan, math.nan, "error: x")]  # fmt: skip
    table = summary_table(failed, ["idm", "dps"])  # a method that scored nothing leaves the others their means
    assert "| `idm` | 25.00 ± 7.07 |" in table and "| `dps` | - | - | - | 3 | 0 (2 failed) |" in table
    from benchmarks.tradeoff import method_points

    twice = [row("idm", "a", 20.0), row("idm", "a", 30.0)]  # a second row of one image: the first counts, in both
    assert "| `idm` | 20.00 ± 0.00 |" in summary_table(twice, ["idm"]) and method_points(twice)[0].psnr == 20.0


def test_the_timing_scripts_refuse_an_unusable_unet_before_creating_out(tmp_path, capsys):
    """A --unet that is no U-Net (a missing folder, a config of another class) is named, and --out not created."""
    from benchmarks import kernel_profile, memory, saved_tensors, speed
    from benchmarks.report import run_script

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    for script in (memory, saved_tensors, kernel_profile, speed):
        for unet, message in ((tmp_path / "missing", "is neither 'tiny', 'sd15', an existing folder nor the name of a "
                               "shipped prior"), (other, "describes 'AutoencoderKL', not one of the supported U-Nets")):  # fmt: skip
            out = tmp_path / "out"
            name = script.__name__
            assert run_script(script.main, name, ["--device", "cpu", "--unet", str(unet), "--out", str(out)]) == 2
            assert message in capsys.readouterr().err and not out.exists(), name


def test_a_failed_capture_is_a_row_and_the_run_goes_on(monkeypatch, capsys):
    """On the GPU a capture that fails (an operation CUDA graphs do not allow) is recorded with its first line
    and its traceback goes to the log; without --cuda-graphs such an error is not hidden."""
    import argparse

    from benchmarks import memory

    def refused(*args, **kwargs):  # as torch's capture: leaving it raises a second error over the first
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(memory, "measure", refused)
    args = argparse.Namespace(size=32, unet="tiny", iters=1, warmup=0, seed=0, cuda_graphs=True)
    row = memory.measure_or_oom("both", None, 2, 1, args, torch.device("cpu"))
    assert row["status"] == "capture failed: RuntimeError: operation not permitted when stream is capturing"
    assert row["timing"] == "cuda graph" and "Traceback" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="previous error during capture"):  # not hidden without --cuda-graphs
        memory.measure_or_oom("both", None, 2, 1, argparse.Namespace(**{**vars(args), "cuda_graphs": False}), torch.device("cpu"))


def test_training_setup_is_captured_only_when_made_capturable():
    from benchmarks.memory import training_setup

    training = training_setup("both", 1, 1, 32, "tiny", torch.device("cpu"))
    assert not training.capturable and training.optimizer.defaults["capturable"] is False
    with pytest.raises(ValueError, match="capturable=True"):
        training.captured_iteration()


def test_speed_benchmark_keeps_the_rows_of_a_stopped_run(tmp_path, monkeypatch):
    """A run stopped by a time limit (here: interrupted at its second row) leaves the finished rows in speed.csv."""
    from benchmarks import speed

    real, calls = speed.inference_row, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(speed, "inference_row", stopping)
    with pytest.raises(KeyboardInterrupt):
        speed.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "1", "2", "--iters", "1", "--warmup", "0",
                    "--out", str(tmp_path)])  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert [(r["batch"], r["status"]) for r in rows] == [("1", "ok")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("task, channels, kwargs", [("cs", 1, dict(ratio=0.1)), ("mri", 2, dict(acceleration=4)),
                                                    ("inpainting", 1, dict(ratio=0.5))])  # fmt: skip
def test_captured_inference_replays_the_eager_forward(task, channels, kwargs):
    """A CUDA graph of ``model(y, op)`` gives the eager output; replays follow new values written into ``y``."""
    import operators
    from benchmarks.speed import captured

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = IDM(IDMConfig(unet="tiny", image_channels=channels, steps=2, final_projection=True)).to(device).for_inference()
    op = operators.make(task, img_size=(32, 32), channels=channels, **kwargs)
    x = torch.rand(2, channels, 32, 32, device=device)
    y = op.A(x)
    with torch.no_grad():
        eager = model(y, op)
        replay = captured(lambda: model(y, op), device)
        assert torch.allclose(replay(), eager, rtol=0, atol=1e-5)
        y.copy_(op.A(x.flip(-1)))
        assert torch.allclose(replay(), model(y, op), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["none", "both"])
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 2e-2)])  # fp32: atomics in some backward kernels
def test_captured_training_iteration_replays_the_eager_one(variant, precision, tolerance):
    """A CUDA graph of the whole training iteration (forward, backward with the memory-saving recomputation,
    Adam step) gives the eager iteration's gradients, follows new data written into x and y, and steps Adam."""
    import copy

    import operators
    from benchmarks.memory import VARIANTS
    from benchmarks.timing import TrainingSetup

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = IDM(IDMConfig(unet="tiny", image_channels=1, steps=2, **VARIANTS[variant])).to(device)
    op = operators.make("cs", img_size=(32, 32), channels=1, ratio=0.25)
    reference = TrainingSetup.for_model(copy.deepcopy(model), op, 2, 32, precision, lr=0.0)
    rate = torch.zeros((), device=device)  # a tensor read by the captured Adam step: changed in place below
    graphed = TrainingSetup.for_model(model, op, 2, 32, precision, lr=rate, capturable=True)
    graphed.x.copy_(reference.x), graphed.y.copy_(reference.y)
    replay = graphed.captured_iteration()

    def assert_same_gradients() -> None:
        reference.iteration()
        replay()
        torch.cuda.synchronize()
        for (name, p), q in zip(model.named_parameters(), reference.model.parameters()):
            assert p.grad is not None and q.grad is not None, name
            assert (p.grad - q.grad).norm() <= tolerance * q.grad.norm() + 1e-12, name

    assert_same_gradients()
    x = torch.rand_like(reference.x)
    for setup in (reference, graphed):  # the static inputs take new values; the replay follows them
        setup.x.copy_(x), setup.y.copy_(op.A(x))
    assert_same_gradients()
    before = [p.detach().clone() for p in model.parameters()]
    rate.fill_(1e-3)
    replay()
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    assert sum(changed) > len(changed) // 2


def test_memory_benchmark_tracks_everything_on_the_cpu(tmp_path):
    from benchmarks import memory

    assert memory.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "1", "--steps", "1", "2",
                        "--variants", "none", "checkpoint", "both", "--iters", "1", "--warmup", "0",
                        "--ablations", "last-step-recomputed", "unwired-layers-plain", "attention-kept",
                        "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = {(r["variant"], int(r["steps"])): r for r in csv.DictReader(open(tmp_path / "memory.csv"))}
    assert {r["memory_kind"] for r in rows.values()} == {"peak_tracked"}
    mib = {key: float(r["memory_mb"]) for key, r in rows.items()}
    weights = 0.355e6 * 4 / 2**20  # the tiny IDM's float32 parameters (MiB), part of every peak
    assert all(m > weights for m in mib.values())
    # plain autograd keeps every step's activations; the memory-saving backward adds only the shared
    # U-Net's gradient, kept from step 2 while step 1 is recomputed (one parameter-sized set)
    assert mib[("none", 2)] - mib[("none", 1)] > 3 * (mib[("both", 2)] - mib[("both", 1)])
    assert mib[("both", 2)] - mib[("both", 1)] < 1.2 * weights
    assert mib[("checkpoint", 2)] < mib[("none", 2)]  # checkpointed recomputation is seen too
    # the levers: keeping the last step's graph costs no peak; the unwired layers' saved maps are seen
    assert abs(mib[("both, last-step-recomputed", 2)] - mib[("both", 2)]) < 0.02 * weights
    assert mib[("both, unwired-layers-plain", 2)] > mib[("both", 2)] + weights
    # the kept attention products (Q, K, V and the result of every attention call of one step) are seen
    assert mib[("both", 2)] < mib[("both, attention-kept", 2)] < mib[("none", 2)]
    assert (tmp_path / "memory.png").is_file() and "T=2" in (tmp_path / "memory.md").read_text()
    assert "`both, unwired-layers-plain`" in (tmp_path / "memory.md").read_text()
    with pytest.raises(SystemExit):  # ablations of `both` without it
        memory.main(["--device", "cpu", "--variants", "none", "--ablations", "last-step-recomputed", "--out", str(tmp_path)])


def test_interleaved_rows_are_timed_round_robin_and_measured_one_by_one(tmp_path, monkeypatch, capsys):
    from benchmarks import memory

    order = []
    real_setup = memory.training_setup

    def recording_setup(variant, *args):
        training = real_setup(variant, *args)
        real_iteration = training.iteration
        training.iteration = lambda: (order.append((variant, args[-1])), real_iteration())[1]
        return training

    monkeypatch.setattr(memory, "training_setup", recording_setup)
    assert memory.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "1", "--steps", "1",
                        "--variants", "none", "both", "--ablations", "unwired-layers-plain", "--interleave",
                        "--iters", "2", "--warmup", "0", "--out", str(tmp_path)]) == 0  # fmt: skip
    runs = [("none", None), ("both", None), ("both", "unwired-layers-plain")]
    assert order[:6] == runs * 2  # timed: one iteration of each in turn
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "memory.csv"))}
    assert float(rows["both, unwired-layers-plain"]["memory_mb"]) > float(rows["both"]["memory_mb"])
    with pytest.raises(SystemExit):
        memory.main(["--device", "cuda", "--interleave", "--out", str(tmp_path)])
    assert "--interleave is for the CPU" in capsys.readouterr().err


def test_saved_tensors_are_charged_to_the_modules_that_keep_them(tmp_path, capsys):
    from benchmarks import saved_tensors

    def table(variant: str, *extra: str) -> dict[str, float]:
        out = tmp_path / "-".join((variant, *extra))
        assert saved_tensors.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--steps", "2",
                                   "--variant", variant, *extra, "--out", str(out)]) == 0  # fmt: skip
        return {r["module"]: float(r["mib"]) for r in csv.DictReader(open(out / "saved_tensors.csv"))}

    both, none = table("both"), table("none")
    plain_unwired = table("both", "--ablation", "unwired-layers-plain")
    assert sum(both.values()) < 0.5 * sum(none.values())
    assert sum(both.values()) < 0.8 * sum(plain_unwired.values())
    assert any(".resnets." in module for module in both)  # the unwired resnets keep their convolutions' outputs
    assert "Kept for backward" in (tmp_path / "both" / "saved_tensors.md").read_text()
    for bad, message in [(["--steps", "0"], "argument --steps: must be at least 1, got 0"), (["--variant", "none", "--ablation", "last-step-recomputed"], "use --variant both")]:
        with pytest.raises(SystemExit):
            saved_tensors.main([*bad, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err


def test_flops_are_counted_without_computing_and_include_attention(tmp_path):
    from benchmarks import flops

    assert flops.main(["--unet", "tiny", "--size", "32", "--steps", "2", "--out", str(tmp_path)]) == 0
    rows = {r["upsamplers"]: r for r in csv.DictReader(open(tmp_path / "flops.csv"))}
    unfolded, folded = rows["diffusers"], rows["low resolution"]
    assert float(folded["gflop_per_image"]) < float(unfolded["gflop_per_image"])
    assert float(folded["attention"]) == float(unfolded["attention"]) > 0
    parts = sum(float(unfolded[k]) for k in ("convolution", "attention", "linear", "other"))
    assert parts == pytest.approx(float(unfolded["gflop_per_image"]), rel=5e-3)  # parts rounded one by one


def test_gpu_checks_script_runs_commands_that_parse(monkeypatch):
    """Every benchmark command of benchmarks/gpu_checks.sh parses (its flags exist), stopped before any work."""
    import importlib
    import re
    import shlex
    from pathlib import Path

    script = (Path(__file__).parent.parent / "benchmarks" / "gpu_checks.sh").read_text().replace("\\\n", " ")
    values = {"DEVICE": "cpu", "SIZE": "32", "SD15": "tiny", "PRIOR": "tiny", "PEAK": "790", "RESULTS": "/tmp/x",
              "stage": "stage", "GRAPHS": "cudagraphs"}  # fmt: skip
    commands = re.findall(r"python3 -m (benchmarks\.\w+) ([^;\n]*);;", script)
    assert {module for module, _ in commands} == {"benchmarks.speed", "benchmarks.memory", "benchmarks.kernel_profile"}
    assert len(commands) == 10

    class Parsed(Exception):
        pass

    def stop(args):
        raise Parsed(args)

    for module, rest in commands:
        device = "cuda" if "--cuda-graphs" in rest or "$GRAPHS" in rest else "cpu"  # refused on the CPU before setup
        argv = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: {**values, "DEVICE": device}[m.group(1)], rest))
        benchmark = importlib.import_module(module)
        monkeypatch.setattr(benchmark, "setup", stop)
        with pytest.raises(Parsed) as parsed:
            benchmark.main(argv)
        assert parsed.value.args[0].device == device


def test_kernel_profile_sums_each_operator_once_by_kind(tmp_path, capsys):
    from benchmarks import kernel_profile

    kinds = {  # names as the H200's profile gave them
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64": "attention",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "void cutlass::Kernel2<cutlass_75_wmma_tensorop_s161616gemm_bf16_32x32_32x1_tn_align1>": "matrix products",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>": "normalisation",
        "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda": "other",
    }
    assert {name: kernel_profile.kind_of(name) for name in kinds} == kinds

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    wall, stalled, rows = kernel_profile.profile_call(lambda: (a @ b).relu(), torch.device("cpu"), warmup=1)
    assert stalled == 0 and 0 < sum(seconds for _, seconds, _ in rows) <= wall
    assert "aten::mm" in {name for name, _, _ in rows}
    _, _, rows = kernel_profile.profile_call(lambda: (a @ b).relu(), torch.device("cpu"), warmup=0, calls=3)
    assert {name: calls for name, _, calls in rows}["aten::mm"] == 1  # per call

    out = tmp_path / "profile"
    assert kernel_profile.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "2", "--train-batch", "1",
                                "--train-variants", "none", "both", "both-attention-kept", "--steps", "2", "--mode", "inference", "train",
                                "--top", "3", "--out", str(out)]) == 0  # fmt: skip
    text = (out / "kernel_profile.md").read_text()
    sections = ["### inference, batch 2", "### training iteration (none), batch 1", "### training iteration (both), batch 1",
                "### training iteration (both-attention-kept), batch 1"]
    assert [text.index(section) for section in sections] == sorted(text.index(section) for section in sections)
    assert "| convolution |" in text and "python -m benchmarks.kernel_profile" in text
    for bad in (["--iters", "0"], ["--train-batch", "0"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit):
            kernel_profile.main([*bad, "--out", str(out)])
        assert f"argument {bad[0]}: must be at least {0 if bad[0] == '--warmup' else 1}" in capsys.readouterr().err


def test_compile_lever_lets_every_group_and_step_compile():
    from benchmarks import speed

    default = torch._dynamo.config.recompile_limit
    with speed.lever_context("compile"):
        assert torch._dynamo.config.recompile_limit == speed.COMPILE_RECOMPILE_LIMIT > default
    with speed.lever_context("base"):
        assert torch._dynamo.config.recompile_limit == default


def test_attention_levers_restrict_attention_to_one_kernel(tmp_path):
    """sdpa-flash has a CPU kernel and gives a timed row; sdpa-cudnn has none on the CPU: an error row."""
    from benchmarks import speed

    out = tmp_path / "speed"
    assert speed.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--steps", "1", "--batch", "1",
                       "--levers", "sdpa-flash", "sdpa-cudnn", "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0  # fmt: skip
    rows = {r["lever"]: r for r in csv.DictReader(open(out / "speed.csv"))}
    assert rows["sdpa-flash"]["status"] == "ok" and float(rows["sdpa-flash"]["ms_per_image"]) > 0
    assert rows["sdpa-cudnn"]["status"].startswith("RuntimeError")


def test_dps_is_a_default_method_only_where_its_step_size_is_known():
    """DPS stops a run where no step size is known (CS, MRI, CT without --dps-zeta), so the default methods
    take it only for inpainting (its authors' value) or with --dps-zeta."""
    from types import SimpleNamespace

    import tasks
    from benchmarks.dps import DPS
    from idm.cli.benchmark import default_methods

    for name in ("cs", "mri", "ct", "inpainting"):
        task = tasks.get(name)
        op = task.make_operator(32)
        chosen = default_methods(task, None).split(",")
        assert chosen[:4] == ["idm", "pinv", "tv", "ddnm"]
        try:
            DPS.step_size(SimpleNamespace(zeta=None), op)  # the lookup a DPS without --dps-zeta does
            known = True
        except ValueError:
            known = False
        assert ("dps" in chosen) == known, name
        assert default_methods(task, "2.0").endswith(",dps")


def _results_csv(folder, rows):
    """An ``idm benchmark`` results.csv of ``(method, image, psnr, ssim, status)`` rows in ``folder``."""
    folder.mkdir(parents=True)
    lines = ["method,image,psnr,ssim,seconds,nfe,status,error"]
    lines += [f"{m},{i},{p},{s},0.1,3,{status}," for m, i, p, s, status in rows]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_compare_scores_runs_image_by_image(tmp_path, capsys):
    """``benchmarks.compare``: means over the images both runs scored, differences OTHER - BASE, the worst image,
    and what was left out (failed in one run, scored by one run only, an infinite PSNR)."""
    from benchmarks import compare

    base = _results_csv(tmp_path / "fp32", [("idm", "a", 30.0, 0.90, "ok"), ("idm", "b", 20.0, 0.60, "ok"),
                                            ("idm", "c", 25.0, 0.70, "ok"), ("idm", "d", "inf", 1.0, "ok"),
                                            ("pinv", "a", 10.0, 0.1, "ok")])  # fmt: skip
    other = _results_csv(tmp_path / "bf16", [("idm", "a", 29.9, 0.89, "ok"), ("idm", "b", 20.3, 0.61, "ok"),
                                             ("idm", "c", "", "", "failed"), ("idm", "d", 50.0, 1.0, "ok"),
                                             ("idm", "e", 28.0, 0.8, "ok")])  # fmt: skip
    out = tmp_path / "cmp"
    assert compare.main([str(base), str(other), "--out", str(out)]) == 0
    (row,) = list(csv.DictReader(open(out / "comparison.csv")))  # pinv: scored by the base run only
    assert row["method"] == "idm" and int(row["images"]) == 2 and int(row["left_out"]) == 3
    assert float(row["base_psnr"]) == pytest.approx(25.0) and float(row["other_psnr"]) == pytest.approx(25.1)
    assert float(row["mean_psnr_difference"]) == pytest.approx(0.1)
    assert float(row["largest_psnr_difference"]) == pytest.approx(0.3) and row["largest_psnr_image"] == "b"
    assert float(row["mean_ssim_difference"]) == pytest.approx(0.0) and float(row["largest_ssim_difference"]) == pytest.approx(0.01)
    printed = capsys.readouterr().out
    assert "+0.100 dB" in printed and "0.300 dB (b)" in printed and printed in (out / "comparison.md").read_text() + "\n"


@pytest.mark.parametrize(
    "make, argv, message",
    [
        (lambda t: None, ["missing", "b"], "missing is not a folder"),
        (lambda t: (t / "empty").mkdir(), ["empty", "b"], "empty holds no results.csv"),
        (lambda t: _results_csv(t / "a", []).joinpath("results.csv").write_text("method,image,psnr\n"), ["a", "b"], "lacks the column(s) ssim, status"),
        (lambda t: _results_csv(t / "a", [("idm", "x", "high", 0.5, "ok")]), ["a", "b"], "line 2: PSNR 'high' / SSIM '0.5' are not numbers"),
        (lambda t: None, ["b"], "give the folders in pairs"),
        (lambda t: _results_csv(t / "a", [("pinv", "x", 20, 0.5, "ok")]), ["a", "b"], "have no method in common"),
        (lambda t: _results_csv(t / "a", [("idm", "y", 20, 0.5, "ok")]), ["a", "b"], "scored no image in common with idm"),
        (lambda t: _results_csv(t / "a", [("idm", "x", 20, 0.5, "ok")]), ["a", "b", "--methods", "tv"], "method(s) tv not scored in both"),
        (lambda t: [(_results_csv(t / "a", [("idm", "x", 20, 0.5, "ok")]) / "benchmark.json").write_text('{"task": {"name": "cs"}, "operator": {"ratio": 0.1}}'),
                    (t / "b" / "benchmark.json").write_text('{"task": {"name": "cs"}, "operator": {"ratio": 0.3}}')],
         ["a", "b"], "did not benchmark the same problem (operator: {'ratio': 0.1} against {'ratio': 0.3})"),
    ],
)
def test_compare_bad_arguments_are_one_line_errors(tmp_path, monkeypatch, capsys, make, argv, message):
    from benchmarks import compare
    from benchmarks.report import run_script

    monkeypatch.chdir(tmp_path)
    _results_csv(tmp_path / "b", [("idm", "x", 21, 0.6, "ok")])
    make(tmp_path)
    try:
        code = run_script(compare.main, "benchmarks.compare", [*argv, "--out", "cmp"])
    except SystemExit as stopped:  # argparse's usage errors
        code = stopped.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("damaged", ["[1, 2]", "not json", None])
def test_a_benchmark_record_that_is_not_an_object_counts_as_absent(tmp_path, damaged):
    """A ``benchmark.json`` that is missing, not JSON, or JSON but not an object is a run without that record,
    for ``benchmarks.compare`` (its problem is not checked) and ``benchmarks.tradeoff`` (no settings to pool)
    alike: one reader, no traceback; a good record beside it is still read."""
    from benchmarks.compare import check_same_problem, read_record
    from benchmarks.tradeoff import check_pooled_methods

    base = _results_csv(tmp_path / "a", [("idm", "x", 20, 0.5, "ok")])
    other = _results_csv(tmp_path / "b", [("idm", "y", 21, 0.6, "ok")])
    if damaged is not None:
        (base / "benchmark.json").write_text(damaged)
    (other / "benchmark.json").write_text('{"task": {"name": "cs"}, "checkpoint": "cs-10"}')
    assert read_record(base) is None
    assert read_record(other) == {"task": {"name": "cs"}, "checkpoint": "cs-10"}
    check_same_problem(base, other)  # not checked: nothing recorded on one side
    with pytest.raises(ValueError, match="idm ran with other settings"):  # the good record is still read
        check_pooled_methods([(base, [{"method": "idm", "image": "x"}]), (other, [{"method": "idm", "image": "y"}])])


def test_dps_runs_from_before_its_clamp_was_recorded_pool_with_runs_that_clamp_to_the_same_range(tmp_path):
    """A DPS run recorded before ``clip_range`` was one of its options clamped to [0, 1]: it pools with a
    later run that records [0, 1], not with one that records [-1, 1]."""
    from benchmarks.tradeoff import check_pooled_methods

    def run(name, image, options):
        folder = _results_csv(tmp_path / name, [("dps", image, 20, 0.5, "ok")])
        record = {"prior_sha256": "p", "dps_zeta": 2.0, "method_options": {"dps": {"steps": 1000, "zeta": 2.0, **options}}}
        (folder / "benchmark.json").write_text(json.dumps(record))
        return folder, [{"method": "dps", "image": image}]

    before = run("before", "x", {})
    check_pooled_methods([before, run("image-range", "y", {"clip_range": [0.0, 1.0]})])
    with pytest.raises(ValueError, match=r"dps ran with other settings .*'clip_range': \[0\.0, 1\.0\].* against .*'clip_range': \[-1\.0, 1\.0\]"):
        check_pooled_methods([before, run("signed-range", "z", {"clip_range": [-1.0, 1.0]})])


def test_a_step_size_record_is_checked_against_the_network_of_its_prior(bench_files, tmp_path):
    """The same prior in another folder passes; another network fails, by the recorded fingerprint or by the
    recorded path where it exists here; a record whose prior is not here is not checked."""
    import shutil

    from idm.pretrain import prior_fingerprint
    from benchmarks.tune_dps import check_tuned_prior

    shutil.copytree(bench_files / "prior", tmp_path / "moved")
    record = tmp_path / "zeta.json"

    def write(**fields):
        record.write_text(json.dumps({"task": "cs", "operator": {"name": "cs"}, "zeta": 2.0, **fields}))

    write(prior=str(bench_files / "prior"), prior_sha256=prior_fingerprint(bench_files / "prior"))
    check_tuned_prior(str(record), tmp_path / "moved")
    check_tuned_prior("2.0", tmp_path / "moved")  # a number is not a record
    write(prior=str(bench_files / "prior"))  # older records: the fingerprint of the recorded path
    check_tuned_prior(str(record), tmp_path / "moved")
    write(prior="/another/machine/prior")
    check_tuned_prior(str(record), tmp_path / "moved")
    torch.manual_seed(1)
    UNet2DModel(**tiny_unet_config(1)).save_pretrained(tmp_path / "other")
    write(prior=str(bench_files / "prior"))
    with pytest.raises(ValueError, match="another network than .*other'; pass --dps-zeta 2.0 to use it anyway"):
        check_tuned_prior(str(record), tmp_path / "other")
