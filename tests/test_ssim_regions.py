"""``benchmarks.ssim_regions``: SSIM split into the ground truth's background and foreground."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from benchmarks import ssim_regions
from benchmarks.report import run_script
from idm.cli import main as idm_main


def _half_dark_image(rng: np.random.Generator) -> np.ndarray:
    """32x32 in [0, 1]: left half 0 (background), right half textured in [0.3, 1]."""
    image = np.zeros((32, 32))
    image[:, 16:] = 0.3 + 0.7 * rng.random((32, 16))
    return image


def test_region_scores_charge_an_error_to_the_region_it_is_in():
    rng = np.random.default_rng(0)
    truth = _half_dark_image(rng)
    same = ssim_regions.region_scores(truth, truth, threshold=0.05)
    assert same["ssim"] == pytest.approx(1.0) and same["background_ssim"] == pytest.approx(1.0)
    assert same["foreground_ssim"] == pytest.approx(1.0) and same["background_fraction"] == 0.5
    assert same["background_abs_error"] == 0.0 and same["foreground_abs_error"] == 0.0
    hazy = truth.copy()
    hazy[:, :8] += 0.02 * rng.random((32, 8))  # faint residue in the background, away from the edge
    scores = ssim_regions.region_scores(hazy, truth, threshold=0.05)
    assert scores["background_ssim"] < 0.9  # faint, but SSIM's small-signal windows punish it
    assert scores["foreground_ssim"] == pytest.approx(1.0)  # no 7x7 window of the foreground reaches it
    assert scores["background_abs_error"] == pytest.approx(np.abs(hazy - truth)[:, :16].mean())
    assert scores["foreground_abs_error"] == 0.0
    bright = ssim_regions.region_scores(truth + 1, truth + 1, threshold=0.05)  # no background at all
    assert math.isnan(bright["background_ssim"]) and bright["background_fraction"] == 0.0


@pytest.fixture()
def mri_run(tmp_path, monkeypatch):
    """An ``idm benchmark`` run of ``pinv`` on two 32x32 MR-like PNGs, with its images, run from ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        Image.fromarray((_half_dark_image(rng) * 255).astype(np.uint8)).save(tmp_path / "images" / f"{name}.png")
    assert idm_main([
        "benchmark", "--task", "mri", "--data", "images", "--methods", "pinv", "--device", "cpu", "--seed", "2",
        "--no-progress", "--out", "run",
    ]) == 0  # fmt: skip
    return tmp_path / "run"


def test_regions_of_a_benchmark_run_match_its_scores(mri_run, capsys):
    assert run_script(ssim_regions.main, "benchmarks.ssim_regions", [str(mri_run)]) == 0
    with open(mri_run / "ssim_regions.csv") as handle:
        rows = list(csv.DictReader(handle))
    with open(mri_run / "results.csv") as handle:
        scored = {row["image"]: float(row["ssim"]) for row in csv.DictReader(handle)}
    assert [(row["method"], row["image"]) for row in rows] == [("pinv", "a"), ("pinv", "b")]
    for row in rows:
        assert float(row["ssim"]) == pytest.approx(scored[row["image"]], abs=0.01)  # read back from 8-bit PNGs
        assert float(row["background_fraction"]) == pytest.approx(0.5)
        assert float(row["background_ssim"]) < 1 and float(row["foreground_abs_error"]) > 0
    table = (mri_run / "ssim_regions.md").read_text()
    assert "python -m benchmarks.ssim_regions" in table and "| `pinv` | 2 |" in table
    assert "| `pinv` | 2 |" in capsys.readouterr().out


def test_a_run_it_cannot_read_is_a_clear_error(mri_run, tmp_path, capsys):
    def fails(argv, message):
        assert run_script(ssim_regions.main, "benchmarks.ssim_regions", argv) == 2
        assert message in capsys.readouterr().err

    fails([str(tmp_path / "images")], "has no benchmark.json naming its task and images")
    (mri_run / "recon" / "pinv" / "b.png").write_bytes(b"not a png")
    fails([str(mri_run)], "cannot read the reconstruction")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mri_run / "recon" / "pinv" / "b.png")
    fails([str(mri_run)], "is 16x16, its ground truth 32x32")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "images" / "a.png")
    fails([str(mri_run)], "changed since the benchmark read it")
    (tmp_path / "images" / "a.png").unlink()
    fails([str(mri_run)], "which is not there")
    with pytest.raises(SystemExit):
        ssim_regions.main([str(mri_run), "--threshold", "1.5"])
    assert "--threshold must lie in (0, 1)" in capsys.readouterr().err


def test_runs_of_single_images_pool_into_one_table(mri_run, tmp_path, capsys):
    """Each image run alone with the seed of its index in the two-image run (--seed 2, then 3) pools into the
    rows of that run; a run of another problem is refused, and so is pooling without --out."""
    for name, seed in (("a", "2"), ("b", "3")):
        assert idm_main(["benchmark", "--task", "mri", "--data", f"images/{name}.png", "--methods", "pinv",
                         "--device", "cpu", "--seed", seed, "--no-progress", "--out", f"run-{name}"]) == 0  # fmt: skip
    argv = [str(tmp_path / "run-a"), str(tmp_path / "run-b"), "--out", str(tmp_path / "pooled")]
    assert run_script(ssim_regions.main, "benchmarks.ssim_regions", argv) == 0
    assert run_script(ssim_regions.main, "benchmarks.ssim_regions", [str(mri_run)]) == 0
    tables = []
    for folder in (tmp_path / "pooled", mri_run):
        with open(folder / "ssim_regions.csv") as handle:
            tables.append(list(csv.DictReader(handle)))
    assert tables[0] == tables[1]  # the same images, measured alike, scored alike
    assert idm_main(["benchmark", "--task", "mri", "--acceleration", "8", "--center-fraction", "0.04", "--data",
                     "images/b.png", "--methods", "pinv", "--device", "cpu", "--seed", "3", "--no-progress",
                     "--out", "run-8x"]) == 0  # fmt: skip
    capsys.readouterr()
    argv = [str(tmp_path / "run-a"), str(tmp_path / "run-8x"), "--out", str(tmp_path / "mixed")]
    assert run_script(ssim_regions.main, "benchmarks.ssim_regions", argv) == 2
    assert "did not benchmark the same problem (operator:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ssim_regions.main([str(tmp_path / "run-a"), str(tmp_path / "run-b")])
    assert "--out is required with several runs" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()
