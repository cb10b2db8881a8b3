"""Fully sampled fastMRI k-space as MRI ground truths (``FastMRIImageDataset``, the mri task's loader,
``idm benchmark`` on ``.h5`` files) and the random phase of ``idm train --random-phase``."""

from __future__ import annotations

import csv
import math

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import tasks
from idm.cli import main
from idm.metrics import psnr
from idm.training import seeds
from idm.training.batches import ShardedBatches
from idm.training.phase import random_phase_maps, with_phase
from tasks.data import ConcatSlices, DataError, FastMRIImageDataset, kspace_to_image
from tests.conftest import picture_folder

_AXES = (-2, -1)


def _centred_fft(images: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=_AXES), norm="ortho"), axes=_AXES)


def _volume(slices: int = 2, size: int = 32) -> np.ndarray:
    """``(slices, size, size)`` complex images in scanner units (~1e-4), with a smooth phase."""
    yy, xx = np.mgrid[:size, :size]
    mag = 0.2 + 0.8 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size * 2.0))
    return np.stack([(0.5 + 0.5 * s) * mag * np.exp(1j * (0.4 * xx / size + s)) for s in range(slices)]) * 1e-4


def _write(path, images, mask=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=_centred_fft(images).astype(np.complex64))
        if mask is not None:
            f.create_dataset("mask", data=mask)
    return path


@pytest.fixture()
def volume_file(tmp_path):
    images = _volume()
    return _write(tmp_path / "vol.h5", images), images


def test_items_are_the_complex_images_scaled_by_the_volumes_largest_magnitude(volume_file):
    path, images = volume_file
    ds = FastMRIImageDataset(path)
    assert len(ds) == 2 and [ds.item_name(i) for i in range(2)] == ["vol_s0", "vol_s1"]
    assert ds.item_source(1) == (path, 1)
    expected = images / np.abs(images).max()  # one number for the whole volume: the slices keep their ratio
    for s in range(2):
        item = ds[s]
        assert item.shape == (2, 32, 32) and item.dtype == torch.float32
        np.testing.assert_allclose(item[0].numpy() + 1j * item[1].numpy(), expected[s], atol=1e-5)
    assert float(ds[1].norm(dim=0).max()) == pytest.approx(1.0, abs=1e-5)
    assert float(ds[0].norm(dim=0).max()) == pytest.approx(0.5, abs=1e-5)


def test_measuring_an_item_gives_the_files_kspace_at_the_sampled_columns(volume_file):
    path, _ = volume_file
    ds = FastMRIImageDataset(path)
    op = tasks.get("mri").make_operator((32, 32), seed=1)
    y = op.A(ds[0][None])[0]
    with h5py.File(path) as f:
        kspace = torch.from_numpy(f["kspace"][0]) / ds.scales[path]
    sampled = op.mask.bool()  # (H, W), whole columns
    torch.testing.assert_close(torch.complex(y[0], y[1])[sampled], kspace[sampled], atol=1e-6, rtol=1e-5)
    assert float(torch.complex(y[0], y[1])[~sampled].abs().max()) == 0


def test_crops_and_flips_keep_the_complex_pairs(volume_file):
    path, _ = volume_file
    ds = FastMRIImageDataset(path, crop=16, augment=True, seed=3)
    item = ds[0]
    assert item.shape == (2, 16, 16)
    assert float(item.norm(dim=0).max()) <= 1.0 + 1e-6
    assert torch.equal(item, ds[0])  # seeded by (seed, epoch, index)


def test_undersampled_and_bad_files_are_refused_by_name(tmp_path):
    images = _volume(1)
    masked = _write(tmp_path / "masked.h5", images, mask=np.arange(32) % 2 == 0)
    with pytest.raises(DataError, match=r"masked.h5: holds a 'mask'.*undersampled.*idm reconstruct"):
        FastMRIImageDataset(masked)
    zeros = _write(tmp_path / "zeros.h5", np.zeros_like(images))
    with pytest.raises(DataError, match="zeros.h5: the k-space is all zeros"):
        FastMRIImageDataset(zeros)
    bad = _volume(2)
    bad[1, 3, 3] = np.nan  # in the second slice: the first one's peak is finite
    with pytest.raises(DataError, match="nan.h5: k-space contains NaN"):
        FastMRIImageDataset(_write(tmp_path / "nan.h5", bad))
    with h5py.File(tmp_path / "multicoil.h5", "w") as f:
        f.create_dataset("kspace", data=np.zeros((1, 2, 8, 8), np.complex64))
    with pytest.raises(DataError, match=r"multicoil.h5.*multi-coil data is not supported yet"):
        FastMRIImageDataset(tmp_path / "multicoil.h5")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"small.png: not a fastMRI .h5 file"):
        FastMRIImageDataset(tmp_path / "small.png")


def test_the_mri_task_reads_kspace_files_beside_magnitude_images(tmp_path, volume_file):
    path, _ = volume_file
    pictures = picture_folder(tmp_path, 32)
    task = tasks.get("mri")
    only_kspace = task.dataset([path])
    assert isinstance(only_kspace, FastMRIImageDataset)
    both = task.dataset([str(pictures), str(tmp_path)])  # a folder of .h5 files counts as k-space
    assert isinstance(both, ConcatSlices) and len(both) == 3
    assert float(both[0][1].abs().max()) == 0  # the magnitude image: zero imaginary part
    assert float(both[1][1].abs().max()) > 0.1  # the k-space image: its phase
    with pytest.raises(DataError, match="vol.h5: not an image file.*the mri task's `idm benchmark` and `idm train` read"):
        tasks.get("cs").dataset([path])


def test_benchmark_scores_methods_against_the_fully_sampled_image(tmp_path, volume_file):
    path, images = volume_file
    out = tmp_path / "bench"
    assert main(["benchmark", "--task", "mri", "--data", str(path), "--methods", "pinv", "--device", "cpu",
                 "--no-progress", "--no-images", "--out", str(out)]) == 0  # fmt: skip
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["image"]) for r in rows] == [("pinv", "vol_s0"), ("pinv", "vol_s1")]
    truth = torch.from_numpy(np.abs(images) / np.abs(images).max())
    for s, row in enumerate(rows):  # zero-filled with the mask of seed s (the run's seed plus the image index)
        op = tasks.get("mri").make_operator((32, 32), seed=s)
        gt = torch.from_numpy(images[s] / np.abs(images).max()).to(torch.complex64)
        x = torch.stack((gt.real, gt.imag))[None]
        zero_filled = op.A_dagger(op.A(x))[0].norm(dim=0).clamp(0, 1)
        assert float(row["psnr"]) == pytest.approx(psnr(zero_filled.numpy(), truth[s].numpy(), 1.0), abs=1e-3)


def test_kspace_folders_skip_hidden_files_and_simulate_refuses_them(tmp_path, volume_file, capsys):
    """macOS's ._vol.h5 beside vol.h5 is no scan: a folder's k-space files leave hidden ones out (as image
    listings do); idm simulate refuses a folder of k-space files as it refuses one file (they are measurements)."""
    from idm.cli.reconstruct import input_kind
    from tasks.data.images import KSPACE_SUFFIXES, files_in

    path, _ = volume_file
    (tmp_path / "._vol.h5").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert files_in(tmp_path, KSPACE_SUFFIXES) == [path]
    hidden_only = tmp_path / "hidden"
    hidden_only.mkdir()
    (hidden_only / "._vol.h5").write_bytes(b"\x00\x05\x16\x07")
    assert input_kind(tmp_path, None) == "h5" and input_kind(hidden_only, "mri") == "images"
    assert len(tasks.get("mri").dataset([tmp_path])) == 2  # the two slices of vol.h5
    assert main(["simulate", "--task", "mri", "--input", str(tmp_path), "--keep-truth", "--device", "cpu",
                 "--out", str(tmp_path / "m.npz")]) == 2  # fmt: skip
    assert "fastMRI .h5 files already hold measured k-space" in capsys.readouterr().err
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "a.png")  # beside an .h5: cs measures it
    assert main(["simulate", "--task", "cs", "--ratio", "0.3", "--block", "8", "--input", str(tmp_path), "--device", "cpu",
                 "--out", str(tmp_path / "cs.npz")]) == 0  # fmt: skip


def test_size_resizes_complex_images_keeping_their_signs(tmp_path):
    """--size on k-space files (idm benchmark, idm simulate): the real and imaginary parts keep their signs (they
    were clamped to [0, 1], which left an almost black ground truth), only a magnitude above 1 is scaled back."""
    from benchmarks.harness import load_images as benchmark_images
    from idm.cli.simulate import load_images as simulate_images
    from tasks.data import resize_square

    images = _volume(1) * np.exp(1j * np.pi * np.mgrid[:32, :32][1] / 8)  # phase wraps twice: negative parts
    path = _write(tmp_path / "phase.h5", images)
    task = tasks.get("mri")
    full = task.dataset([path])[0]
    expected = torch.nn.functional.interpolate(full[None].double(), size=(16, 16), mode="bilinear", antialias=True)[0]
    assert float(expected.min()) < -0.3  # what the test is about
    [scored] = benchmark_images(task, [str(path)], size=16)
    _, measured = simulate_images(task, path, size=16)
    for x in (scored.x, measured[0]):
        magnitude = x.norm(dim=0)
        assert float(magnitude.max()) <= 1 + 1e-6
        torch.testing.assert_close(x.double(), expected / expected.norm(dim=0).clamp_min(1), atol=1e-6, rtol=0)
    square = torch.tensor([[[1.0, -1.0], [0.5, 0.0]], [[1.0, 0.0], [-0.5, 0.2]]])  # a corner of magnitude sqrt(2)
    same = resize_square(square, 2, complex_pairs=True)
    assert same is square  # the size it has: untouched
    grown = resize_square(square, 4, complex_pairs=True)
    assert float(grown.norm(dim=0).max()) <= 1 + 1e-6 and float(grown.min()) < 0
    assert float(resize_square(square, 4).min()) == 0  # intensities: clamped to [0, 1]


# ---- random phase ---------------------------------------------------------------------------
def test_random_phase_keeps_magnitudes_and_is_smooth_and_seeded():
    maps = random_phase_maps(3, 32, 40, torch.Generator().manual_seed(0))
    assert maps.shape == (3, 32, 40)
    assert torch.equal(maps, random_phase_maps(3, 32, 40, torch.Generator().manual_seed(0)))
    assert not torch.equal(maps, random_phase_maps(3, 32, 40, torch.Generator().manual_seed(1)))
    assert float(maps.diff(dim=-1).abs().max()) < 0.5 and float(maps.diff(dim=-2).abs().max()) < 0.5  # no jumps
    images = torch.rand(3, 2, 32, 40, dtype=torch.float64)
    rotated = with_phase(images, maps)
    torch.testing.assert_close(rotated.norm(dim=1), images.norm(dim=1), atol=1e-12, rtol=0)
    z = torch.complex(images[:, 0], images[:, 1]) * torch.polar(torch.ones_like(maps, dtype=torch.float64), maps.double())
    torch.testing.assert_close(rotated, torch.stack((z.real, z.imag), dim=1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"complex images \(B, 2, H, W\)"):
        with_phase(torch.rand(3, 1, 32, 40), maps)


def test_random_phase_batches_are_the_same_for_every_rank_split():
    items = [torch.stack((torch.full((8, 8), float(i + 1)), torch.zeros(8, 8))) for i in range(4)]
    whole = ShardedBatches(items, 4, seed=2, augment=False, random_phase=True)
    halves = [ShardedBatches(items, 4, seed=2, rank=r, world_size=2, augment=False, random_phase=True) for r in (0, 1)]
    plain = ShardedBatches(items, 4, seed=2, augment=False)
    for it in range(3):
        batch = whole[it]
        torch.testing.assert_close(torch.cat([h[it] for h in halves]), batch)
        torch.testing.assert_close(batch.norm(dim=1), plain[it].norm(dim=1))
        assert float(batch[:, 1].abs().max()) > 0.1  # the imaginary parts are no longer zero
    expected = random_phase_maps(4, 8, 8, seeds.generator(2, seeds.PHASE, 1))
    torch.testing.assert_close(whole[1], with_phase(plain[1], expected))


def test_random_phase_fraction_phases_that_share_of_the_images_and_keeps_the_maps_of_fraction_one():
    items = [torch.stack((torch.full((8, 8), float(i + 1)), torch.zeros(8, 8))) for i in range(4)]
    every = ShardedBatches(items, 4, seed=2, augment=False, random_phase=1.0)
    legacy = ShardedBatches(items, 4, seed=2, augment=False, random_phase=True)  # how runs before the fraction said it
    half = ShardedBatches(items, 4, seed=2, augment=False, random_phase=0.5)
    none = ShardedBatches(items, 4, seed=2, augment=False, random_phase=0.0)
    phased = []
    for it in range(40):
        torch.testing.assert_close(every[it], legacy[it])
        torch.testing.assert_close(none[it][:, 1], torch.zeros(4, 8, 8))
        batch = half[it]
        has_phase = batch[:, 1].abs().amax(dim=(-2, -1)) > 0
        phased.append(has_phase)
        torch.testing.assert_close(batch[has_phase], every[it][has_phase])  # the same maps where a phase is applied
        torch.testing.assert_close(batch[~has_phase], none[it][~has_phase])
    share = float(torch.stack(phased).float().mean())
    assert 0.35 < share < 0.65, share  # 160 draws of probability 0.5
    for bad in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="random_phase must be a fraction of the images in"):
            ShardedBatches(items, 4, seed=2, random_phase=bad)


def test_train_with_random_phase_records_it_and_refuses_real_images(tmp_path, volume_file, capsys):
    path, _ = volume_file
    base = ["train", "--unet", "tiny", "--steps", "1", "--crop", "16", "--batch-size", "2", "--device", "cpu",
            "--num-workers", "0", "--no-progress", "--iters", "1"]  # fmt: skip
    assert main([*base, "--task", "mri", "--data", str(path), "--random-phase", "--out", str(tmp_path / "run")]) == 0
    assert '"random_phase": 1.0' in (tmp_path / "run" / "checkpoints" / "iter_0000001" / "run.json").read_text()
    assert main([*base, "--task", "mri", "--data", str(path), "--random-phase", "0.5", "--out", str(tmp_path / "half")]) == 0
    assert '"random_phase": 0.5' in (tmp_path / "half" / "checkpoints" / "iter_0000001" / "run.json").read_text()
    assert main([*base, "--task", "mri", "--data", str(path), "--random-phase", "1.5", "--out", str(tmp_path / "over")]) == 2
    assert "random_phase must be a fraction of the images in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "over").exists()
    pictures = picture_folder(tmp_path, 24)
    assert main([*base, "--task", "cs", "--ratio", "0.25", "--block", "8", "--data", str(pictures), "--random-phase",
                 "--out", str(tmp_path / "cs")]) == 2  # fmt: skip
    assert "random_phase needs complex images (2 channels" in capsys.readouterr().err
    assert not (tmp_path / "cs").exists()


def test_real_kspace_warns_for_a_model_trained_without_phase(tmp_path, volume_file, capsys):
    path, _ = volume_file
    pictures = picture_folder(tmp_path, 24)
    base = ["train", "--task", "mri", "--unet", "tiny", "--steps", "1", "--crop", "16", "--batch-size", "2",
            "--device", "cpu", "--num-workers", "0", "--no-progress", "--iters", "1"]  # fmt: skip
    assert main([*base, "--data", str(pictures), "--out", str(tmp_path / "magnitude")]) == 0
    assert main([*base, "--data", str(pictures), "--random-phase", "0.5", "--out", str(tmp_path / "phase")]) == 0
    assert main([*base, "--data", str(path), "--out", str(tmp_path / "kspace")]) == 0  # .h5 images have their phase
    capsys.readouterr()
    for name in ("magnitude", "phase", "kspace"):
        assert main(["reconstruct", "--task", "mri", "--input", str(path), "--checkpoint", str(tmp_path / name),
                     "--device", "cpu", "--no-progress", "--out", str(tmp_path / f"recon-{name}")]) == 0  # fmt: skip
        warned = "trained on magnitude images only" in capsys.readouterr().err
        assert warned == (name == "magnitude"), name
    assert main(["benchmark", "--task", "mri", "--data", str(path), "--methods", "idm", "--checkpoint",
                 str(tmp_path / "magnitude"), "--device", "cpu", "--no-progress", "--no-images",
                 "--out", str(tmp_path / "bench")]) == 0  # fmt: skip
    assert "trained on magnitude images only" in capsys.readouterr().err
    assert "trained on magnitude images only" in (tmp_path / "bench" / "benchmark.json").read_text()


# ---- DPS on images with a phase -------------------------------------------------------------
@pytest.fixture()
def grey_prior(tmp_path):
    from diffusers import UNet2DModel

    from idm.unets import PRIOR_INFO_NAME, tiny_unet_config

    torch.manual_seed(0)
    UNet2DModel(**tiny_unet_config(1)).save_pretrained(tmp_path / "prior")
    (tmp_path / "prior" / PRIOR_INFO_NAME).write_text('{"format": "idm-prior", "data_range": [-1, 1]}')
    return tmp_path / "prior"


def test_benchmark_clamps_dps_to_the_signed_range_on_kspace_files(tmp_path, volume_file, grey_prior, capsys):
    """On k-space files DPS clamps x0 to [-1, 1] (the phase makes the real and imaginary parts signed), on
    magnitude images to [0, 1]; a run mixing both is refused, and a step tuned without a phase is flagged."""
    import json

    path, _ = volume_file
    pictures = picture_folder(tmp_path, 32)
    record = tmp_path / "zeta.json"
    record.write_text(json.dumps({"task": "mri", "zeta": 1.0, "operator": {"name": "mri"}}))  # tuned without a phase
    base = ["benchmark", "--task", "mri", "--methods", "dps", "--dps-steps", "2", "--prior", str(grey_prior),
            "--device", "cpu", "--no-progress", "--no-images", "--limit", "1"]  # fmt: skip
    for data, clip in ((path, [-1.0, 1.0]), (pictures, [0.0, 1.0])):
        out = tmp_path / f"bench-{clip[0]}"
        assert main([*base, "--data", str(data), "--dps-zeta", str(record), "--out", str(out)]) == 0
        settings = json.loads((out / "benchmark.json").read_text())
        assert settings["method_options"]["dps"]["clip_range"] == clip
        assert f"x0 clamped to {clip}" in (out / "summary.md").read_text()
        flagged = any("tuned on crops without a phase" in w for w in settings["warnings"])
        assert flagged == (clip[0] < 0)
    capsys.readouterr()
    assert main([*base, "--data", str(path), str(pictures), "--dps-zeta", "1.0", "--out", str(tmp_path / "mixed")]) == 2
    assert "mixes k-space files" in capsys.readouterr().err and not (tmp_path / "mixed").exists()


def test_tune_dps_with_random_phase_tunes_on_phased_crops_with_the_signed_range(tmp_path, grey_prior, capsys):
    import json

    from benchmarks import tune_dps

    pictures = picture_folder(tmp_path, 32)
    base = ["--prior", str(grey_prior), "--data", str(pictures), "--crop", "16", "--images", "1", "--steps", "2",
            "--grid", "0.5", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert tune_dps.main(["--task", "mri", *base, "--random-phase", "--out", str(tmp_path / "phase.json")]) == 0
    assert tune_dps.main(["--task", "mri", *base, "--out", str(tmp_path / "plain.json")]) == 0
    phase, plain = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("phase", "plain"))
    assert phase["random_phase"] == phase["images"] == ["a"] and phase["clip_range"] == [-1.0, 1.0]
    assert plain["random_phase"] == [] and plain["clip_range"] == [0.0, 1.0]
    assert all(math.isfinite(r["pinv_mean_psnr"]) for r in (phase, plain))  # the zero-filled crops, for reference
    assert phase["pinv_mean_psnr"] != plain["pinv_mean_psnr"]  # the same magnitudes, aliased otherwise with a phase
    from benchmarks.tuning import tuning_parser, tuning_setup

    parser = tuning_parser("tuning", crop=16, images=1)
    parser.add_argument("--grid", type=float, nargs="+", default=[1.0])  # as every tuning script has
    given = ["--task", "mri", "--data", str(pictures), "--crop", "16", "--out", "x.json"]
    crops = [tuning_setup(parser.parse_args([*given, *flag]), parser).images for flag in ([], ["--random-phase"])]
    assert float(crops[0][:, 1].abs().max()) == 0 and float(crops[1][:, 1].abs().max()) > 0.05  # a phase: imaginary parts
    assert torch.allclose(crops[0].norm(dim=1), crops[1].norm(dim=1), atol=1e-6)  # the same magnitudes
    assert tune_dps.phase_warning(str(tmp_path / "phase.json"), True) is None
    assert "magnitude images without one" in tune_dps.phase_warning(str(tmp_path / "phase.json"), False)
    capsys.readouterr()
    for argv, message in ((["--task", "cs", "--random-phase"], "random phase needs complex images"),
                          (["--task", "mri", "--random-phase", "2"], "random_phase must be a fraction")):  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            tune_dps.main([*argv, *base, "--out", str(tmp_path / "bad.json")])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
