"""``benchmarks.background_noise``: the noise level in the corners of scanner and training images."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import background_noise
from benchmarks.report import run_script
from operators.mri import centered_fft2


def _scanner_slice(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``(size, size)`` complex image: a disk of magnitude 1 with a phase ramp in the middle, and complex
    Gaussian noise of deviation ``sigma`` per channel everywhere (the corners are background)."""
    yy, xx = np.mgrid[:size, :size]
    disk = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 5) ** 2) * np.exp(1j * 0.1 * xx)
    return disk + sigma * (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size)))


def test_corner_rows_measure_each_corner_and_channel():
    x = torch.zeros(2, 8, 8)
    x[0, :3, :3] = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 0.0]])  # top-left, real
    x[1, -3:, -3:] = 0.5  # bottom-right, imaginary: constant
    rows = background_noise.corner_rows("img", x, 3, ["real", "imaginary"])
    assert [(r["corner"], r["channel"]) for r in rows[:2]] == [("top-left", "real"), ("top-left", "imaginary")]
    assert len(rows) == 8
    top_left_real = rows[0]
    values = x[0, :3, :3].double()
    assert top_left_real["std"] == pytest.approx(float(values.std()))
    assert top_left_real["max_abs"] == 1.0 and top_left_real["zero_fraction"] == pytest.approx(1 / 9)
    bottom_right_imaginary = rows[-1]
    assert bottom_right_imaginary["std"] == 0.0 and bottom_right_imaginary["max_abs"] == 0.5
    assert bottom_right_imaginary["zero_fraction"] == 0.0
    assert all(r["zero_fraction"] == 1.0 for r in rows[1:-1])


@pytest.mark.parametrize("size", [1, 5])
def test_corners_that_would_overlap_or_hold_no_spread_are_refused(size):
    with pytest.raises(ValueError, match=r"--corner must lie in \[2, 4\] for a 8x9 image"):
        background_noise.corner_patches(torch.zeros(1, 8, 9), size)


def test_a_scanner_files_noise_is_read_in_units_of_its_largest_magnitude(tmp_path, capsys):
    """A fully sampled fastMRI file whose image has noise of deviation 0.02 (its largest magnitude about 1):
    every corner's deviation comes out near 0.02 / that magnitude, in both channels, and no corner is zeros.
    A magnitude PNG with a black border reads as exact zeros there."""
    rng = np.random.default_rng(0)
    image = _scanner_slice(64, 0.02, rng)
    kspace = centered_fft2(torch.from_numpy(image)).numpy()
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f.create_dataset("kspace", data=kspace[None].astype(np.complex64) * 1e-4)  # scanner units
    picture = np.zeros((64, 64), np.uint8)
    picture[20:44, 20:44] = 200
    (tmp_path / "pictures").mkdir()
    Image.fromarray(picture).save(tmp_path / "pictures" / "clean.png")
    out = tmp_path / "out"
    argv = [str(tmp_path / "scan.h5"), str(tmp_path / "pictures"), "--corner", "16", "--out", str(out)]
    assert run_script(background_noise.main, "benchmarks.background_noise", argv) == 0
    with open(out / "background_noise.csv") as handle:
        rows = list(csv.DictReader(handle))
    scan = [r for r in rows if r["image"].startswith("scan")]
    clean = [r for r in rows if r["image"] == "clean"]
    assert len(scan) == 8 and len(clean) == 8
    expected = 0.02 / np.abs(image).max()
    for row in scan:  # 256 values a corner: the deviation is known to about 5 %
        assert float(row["std"]) == pytest.approx(expected, rel=0.2), row
        assert float(row["zero_fraction"]) == 0.0
    assert {r["channel"] for r in scan} == {"real", "imaginary"}
    assert all(float(r["std"]) == 0.0 and float(r["zero_fraction"]) == 1.0 for r in clean)
    table = (out / "background_noise.md").read_text()
    assert table.startswith("`python -m benchmarks.background_noise ") and "| clean | real | 0.0000-0.0000 |" in table
    assert table in capsys.readouterr().out


def test_an_image_too_small_for_the_corners_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "pictures").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "pictures" / "small.png")
    argv = [str(tmp_path / "pictures"), "--out", str(tmp_path / "out")]
    assert run_script(background_noise.main, "benchmarks.background_noise", argv) != 0
    assert "--corner must lie in [2, 8] for a 16x16 image, got 32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
