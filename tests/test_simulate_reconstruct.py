"""``idm simulate`` / ``idm reconstruct``, the measurement formats and the fastMRI / CT file paths.

Tiny random-weight IDMs (1 step) in tmp folders, 16-40 pixel images, all written here
(PNG, HU .npy, DICOM, fastMRI-layout .h5); nothing from shared data.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import operators
import tasks
from idm import IDM, IDMConfig
from idm.cli import main
from operators import OperatorInputError
from tasks.data import inverse_hu_window
from tasks.measurements import (
    Measurement,
    MeasurementFileError,
    load_measurements,
    load_sinogram,
    save_measurements,
    sidecar_path,
)

HEADER = (
    '<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
    "<encodedSpace><matrixSize><x>32</x><y>32</y><z>1</z></matrixSize></encodedSpace>"
    "<reconSpace><matrixSize><x>24</x><y>24</y><z>1</z></matrixSize></reconSpace></encoding></ismrmrdHeader>"
)


def _model(root, name, task, channels, operator_config):
    """A tiny IDM model folder with the ``run.json`` an ``idm train`` checkpoint carries."""
    folder = root / name
    torch.manual_seed(0)
    IDM(IDMConfig(unet="tiny", image_channels=channels, steps=1)).save_pretrained(folder)
    run = {"format": "idm-train-run", "identity": {"task": task, "operator": operator_config}}
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def _write_dicom(path, hu: np.ndarray, modality: str = "CT") -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.PixelData = (hu + 1024).astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write_fastmri(path, kspace, esc=None, mask=None, header=HEADER):
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        if esc is not None:
            f.create_dataset("reconstruction_esc", data=esc)
            f.attrs["max"] = float(esc.max())
        if mask is not None:
            f.create_dataset("mask", data=mask)
        f.create_dataset("ismrmrd_header", data=np.bytes_(header))
        f.attrs["acquisition"] = "AXT2"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("simrec")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(root / "images" / "a.png")
    Image.fromarray((rng.random((28, 36)) * 255).astype(np.uint8)).save(root / "images" / "b.png")  # padded to 32x40
    (root / "small").mkdir()
    Image.fromarray((rng.random((6, 20)) * 255).astype(np.uint8)).save(root / "small" / "tiny.png")

    # CT: a slice in HU (.npy, int16 with out-of-field padding) and the same as DICOM; an MR DICOM
    (root / "ct").mkdir()
    yy, xx = np.mgrid[:32, :32]
    hu = np.where((yy - 16) ** 2 + (xx - 16) ** 2 < 140, 40 + 400 * (xx > 16), -1000).astype(np.int16)
    hu[0, :3] = -3024
    np.save(root / "ct" / "slice.npy", hu)
    (root / "dicom").mkdir()
    _write_dicom(root / "dicom" / "ct.dcm", np.maximum(hu, -1024))
    _write_dicom(root / "mr.dcm", np.maximum(hu, -1024), modality="MR")

    # fastMRI single-coil layout: 2 slices of complex 32x32 images in scanner units (~1e-4)
    (root / "mri").mkdir()
    mag = 0.2 + 0.8 * np.exp(-((yy - 16) ** 2 + (xx - 15) ** 2) / 60.0)
    images = np.stack([mag * np.exp(1j * 0.3 * xx / 32), 0.7 * mag * np.exp(-1j * 0.2 * yy / 32)]) * 1e-4
    axes = (-2, -1)
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=axes), norm="ortho"), axes=axes).astype(np.complex64)
    esc = np.abs(images)[:, 4:28, 4:28].astype(np.float32)
    _write_fastmri(root / "mri" / "full.h5", kspace, esc=esc)
    columns = np.zeros(32, dtype=bool)
    columns[::3] = True
    columns[14:18] = True
    _write_fastmri(root / "masked.h5", kspace * columns, mask=columns)
    with h5py.File(root / "nokspace.h5", "w") as f:
        f.create_dataset("reconstruction_esc", data=esc)
    _write_fastmri(root / "multicoil.h5", np.stack([kspace, kspace], axis=1))

    models = root / "models"
    cs = tasks.get("cs").make_operator((32, 32), ratio=0.25, block=8).config()
    _model(models, "cs", "cs", 1, cs)
    _model(models, "cs-phi5", "cs", 1, {**cs, "phi_seed": 5})
    _model(models, "inpainting", "inpainting", 3, tasks.get("inpainting").make_operator((32, 32)).config())
    _model(models, "mri", "mri", 2, tasks.get("mri").make_operator((32, 32)).config())
    _model(models, "ct20", "ct", 1, tasks.get("ct").make_operator((32, 32), views=20).config())
    _model(models, "ct30", "ct", 1, tasks.get("ct").make_operator((32, 32), views=30).config())
    return root


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _error(capsys) -> str:
    return capsys.readouterr().err


# ---- the .npz format ------------------------------------------------------------------------
def test_measurement_file_round_trip_and_clear_errors(tmp_path):
    ops = [operators.make("cs", img_size=(16, 16), ratio=0.25, block=8, seed=1),
           operators.make("cs", img_size=(16, 24), ratio=0.25, block=8, seed=2)]  # fmt: skip
    xs = [torch.rand(1, 16, 16), torch.rand(1, 16, 20)]
    items = [
        Measurement("p", ops[0].A(xs[0][None])[0].numpy(), ops[0].config(), (16, 16), 1, xs[0].numpy()),
        Measurement("q", ops[1].A(torch.nn.functional.pad(xs[1], (0, 4))[None])[0].numpy(), ops[1].config(), (16, 20), 2, xs[1].numpy()),
    ]
    path = save_measurements(tmp_path / "m.npz", "cs", items, {"idm_version": "test"})
    with np.load(path, allow_pickle=False) as data:
        assert {"meta", "names", "y_0", "y_1", "x_true_0", "x_true_1"} == set(data.files)  # two shapes: one array each
    loaded = load_measurements(path)
    assert loaded.task == "cs" and loaded.has_truth and loaded.meta["idm_version"] == "test"
    assert [m.name for m in loaded.items] == ["p", "q"] and loaded.items[1].image_size == (16, 20)
    assert loaded.items[1].padded_size == (16, 24) and loaded.items[1].seed == 2
    np.testing.assert_array_equal(loaded.items[1].y, items[1].y)
    assert loaded.operator(1).config() == ops[1].config()

    bare = Measurement("r", items[0].y, ops[0].config(), (16, 16))
    same = save_measurements(tmp_path / "same.npz", "cs", [bare, Measurement("s", items[0].y, ops[0].config(), (16, 16))])
    with np.load(same) as data:
        assert data["y"].shape == (2, 1, 4, 16) and "x_true" not in data.files  # one shape: stacked
    with pytest.raises(MeasurementFileError, match="either every item or none"):
        save_measurements(tmp_path / "x.npz", "cs", [items[0], bare])

    (tmp_path / "junk.npz").write_text("not a zip")
    np.save(tmp_path / "single.npy", np.zeros(3))
    np.savez(tmp_path / "nometa.npz", y=np.zeros((1, 1, 4, 16), np.float32))
    np.savez(tmp_path / "badmeta.npz", meta=np.array("{oops"), names=np.array(["p"]), y=np.zeros((1, 1, 4, 16), np.float32))
    meta = json.loads(str(np.load(path)["meta"]))
    np.savez(tmp_path / "pickled.npz", meta=np.array(json.dumps(meta)), names=np.array(["p", "q"], dtype=object))
    np.savez(tmp_path / "notruth.npz", meta=np.array(json.dumps(meta)), names=np.array(["p", "q"]), y_0=items[0].y, y_1=items[1].y)
    meta["items"][0]["operator"]["ratio"] = 0.5  # y no longer fits its operator
    meta["truth"] = False
    np.savez(tmp_path / "shape.npz", meta=np.array(json.dumps(meta)), names=np.array(["p", "q"]), y_0=items[0].y, y_1=items[1].y)
    meta = json.loads(str(np.load(path)["meta"]))
    meta["items"][0]["name"] = "../escaped"  # would write NAME.png outside the output folder
    np.savez(tmp_path / "escape.npz", meta=np.array(json.dumps(meta)), names=np.array(["../escaped", "q"]), y_0=items[0].y,
             y_1=items[1].y, x_true_0=items[0].x_true, x_true_1=items[1].x_true)  # fmt: skip
    meta["items"][0]["name"] = "p"
    np.savez(tmp_path / "range.npz", meta=np.array(json.dumps(meta)), names=np.array(["p", "q"]), y_0=items[0].y,
             y_1=items[1].y, x_true_0=items[0].x_true, x_true_1=items[1].x_true * 255)  # fmt: skip  # 8-bit values
    cases = [
        ("range.npz", MeasurementFileError, r"range.npz: item 1 \(q\): x_true has values in \[.*\], not in \[0, 1\]"),
        ("escape.npz", MeasurementFileError, r"escape.npz: item name '\.\./escaped' is not a plain file name"),
        ("junk.npz", MeasurementFileError, r"junk.npz: not an .npz measurement file"),
        ("single.npy", MeasurementFileError, r"single.npy: holds a single array"),
        ("missing.npz", MeasurementFileError, r"missing.npz' does not exist"),
        ("nometa.npz", MeasurementFileError, r"nometa.npz: not an idm measurement file: no 'meta' array"),
        ("badmeta.npz", MeasurementFileError, r"badmeta.npz: 'meta' is not valid JSON"),
        ("pickled.npz", MeasurementFileError, r"pickled.npz: array 'names' cannot be read without pickle"),
        ("notruth.npz", MeasurementFileError, r"notruth.npz: no 'x_true' array \(nor x_true_0 ... x_true_1\)"),
        ("shape.npz", OperatorInputError, r"shape.npz: item 0 \(p\): y has shape \(1, 4, 16\), but its cs operator \(img_size=16x16, .*ratio=0.5.*\) measures \(1, 4, 32\)"),
    ]  # fmt: skip
    for name, kind, pattern in cases:
        with pytest.raises(kind, match=pattern):
            load_measurements(tmp_path / name)


# ---- CS / images -----------------------------------------------------------------------------
def test_simulate_then_reconstruct_matches_reconstructing_the_images(files, tmp_path, monkeypatch):
    models = files / "models"
    meas = tmp_path / "meas.npz"
    assert main(["simulate", "--task", "cs", "--input", str(files / "images"), "--checkpoint", str(models / "cs"),
                 "--keep-truth", "--seed", "3", "--device", "cpu", "--no-progress", "--out", str(meas)]) == 0  # fmt: skip
    loaded = load_measurements(meas)
    assert [(m.name, m.seed, m.image_size, m.padded_size) for m in loaded.items] == [
        ("a", 3, (32, 32), (32, 32)), ("b", 4, (28, 36), (32, 40))]  # fmt: skip
    assert {m.operator["ratio"] for m in loaded.items} == {0.25} and loaded.items[0].operator["block"] == 8
    assert loaded.meta["operator_seeds"] == "3 + image index (mod 2**32)" and loaded.has_truth

    out = tmp_path / "from_npz"
    assert main(["reconstruct", "--input", str(meas), "--checkpoint", str(models / "cs"), "--device", "cpu",
                 "--seed", "3", "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    assert np.load(out / "b.npy").shape == (1, 28, 36) and np.load(out / "b.npy").dtype == np.float32
    assert Image.open(out / "b.png").size == (36, 28)
    from_npz = _rows(out / "metrics.csv")
    assert [r["name"] for r in from_npz] == ["a", "b"] and list(from_npz[0]) == ["name", "psnr", "ssim", "seconds"]
    assert json.loads((out / "reconstruct.json").read_text())["input_kind"] == "npz"

    # the image folder, simulated in memory with the same seeds, gives the same numbers
    out2 = tmp_path / "from_images"
    assert main(["reconstruct", "--task", "cs", "--input", str(files / "images"), "--checkpoint", str(models / "cs"),
                 "--device", "cpu", "--seed", "3", "--no-progress", "--out", str(out2)]) == 0  # fmt: skip
    assert [(r["name"], r["psnr"], r["ssim"]) for r in _rows(out2 / "metrics.csv")] == [(r["name"], r["psnr"], r["ssim"]) for r in from_npz]
    np.testing.assert_array_equal(np.load(out2 / "a.npy"), np.load(out / "a.npy"))
    record = json.loads((out2 / "reconstruct.json").read_text())  # b is measured zero-padded to whole 8x8 blocks
    assert record["sizes"]["b"] == {"image": [28, 36], "operator": [32, 40]} and "img_size" not in record["operator"]
    assert record["complete"] is True

    # averaged over the eight flips and turns (the 28x36 image turned to 36x28 and back)
    out8 = tmp_path / "ensemble"
    assert main(["reconstruct", "--task", "cs", "--input", str(files / "images"), "--checkpoint", str(models / "cs"),
                 "--device", "cpu", "--seed", "3", "--ensemble", "8", "--no-progress", "--out", str(out8)]) == 0  # fmt: skip
    assert json.loads((out8 / "reconstruct.json").read_text())["ensemble"] == 8
    assert np.load(out8 / "b.npy").shape == (1, 28, 36) and not np.array_equal(np.load(out8 / "b.npy"), np.load(out2 / "b.npy"))

    # without the truth: reconstructions, no metrics; without --checkpoint the task's defaults give the same Phi
    plain = tmp_path / "plain.npz"
    assert main(["simulate", "--task", "cs", "--ratio", "0.25", "--block", "8", "--input", str(files / "images" / "a.png"),
                 "--device", "cpu", "--out", str(plain)]) == 0  # fmt: skip
    assert main(["reconstruct", "--input", str(plain), "--checkpoint", str(models / "cs"), "--device", "cpu",
                 "--out", str(tmp_path / "plain")]) == 0  # fmt: skip
    assert (tmp_path / "plain" / "a.png").is_file() and not (tmp_path / "plain" / "metrics.csv").exists()

    # bf16: the same files, scores within bf16 rounding of float32, the precision recorded
    out3 = tmp_path / "bf16"
    assert main(["reconstruct", "--input", str(meas), "--checkpoint", str(models / "cs"), "--device", "cpu",
                 "--seed", "3", "--precision", "bf16", "--no-progress", "--out", str(out3)]) == 0  # fmt: skip
    assert json.loads((out3 / "reconstruct.json").read_text())["precision"] == "bf16"
    for fast, exact in zip(_rows(out3 / "metrics.csv"), from_npz):
        assert fast["name"] == exact["name"] and abs(float(fast["psnr"]) - float(exact["psnr"])) < 0.5

    # auto (the default) on a device with native bfloat16 is bf16: the bf16 run's numbers, "bf16" recorded
    monkeypatch.setattr("idm.hardware.has_native_bf16", lambda device: True)
    out4 = tmp_path / "auto"
    assert main(["reconstruct", "--input", str(meas), "--checkpoint", str(models / "cs"), "--device", "cpu",
                 "--seed", "3", "--no-progress", "--out", str(out4)]) == 0  # fmt: skip
    assert json.loads((out4 / "reconstruct.json").read_text())["precision"] == "bf16"
    scores = [[(r["name"], r["psnr"], r["ssim"]) for r in _rows(folder / "metrics.csv")] for folder in (out3, out4)]
    assert scores[0] == scores[1]


def test_bad_cs_inputs_are_clear_errors(files, tmp_path, capsys):
    models = files / "models"
    meas = tmp_path / "meas.npz"
    assert main(["simulate", "--task", "cs", "--ratio", "0.25", "--block", "8", "--input", str(files / "images"),
                 "--device", "cpu", "--no-progress", "--out", str(meas)]) == 0  # fmt: skip
    capsys.readouterr()
    rec = ["reconstruct", "--input", str(meas), "--device", "cpu", "--out", str(tmp_path / "out")]
    bare = IDM(IDMConfig(unet="tiny", steps=1)).save_pretrained(tmp_path / "bare")  # no run.json: no task recorded
    sinogram = tmp_path / "sino.npy"  # 46 detector cells: a 32x32 image; 45 views, which no model serves
    np.save(sinogram, np.random.default_rng(0).random((46, 45)).astype(np.float32))
    cases = [
        (rec, "no shipped model serves task 'cs' (ratio=0.25, block=8, mode='permuted', phi_seed=0)"),
        (rec, "pass --checkpoint DIR"),
        (rec + ["--checkpoint", str(models / "inpainting")], "task: trained for 'inpainting', requested 'cs'"),
        (rec + ["--checkpoint", str(models / "cs-phi5")], "operator phi_seed: trained with 5, requested 0"),
        (rec + ["--checkpoint", str(models / "cs"), "--ratio", "0.5"], "was measured with ratio=0.25; --ratio 0.5 does not match"),
        (rec + ["--checkpoint", str(models / "cs"), "--views", "60"], "which records no views: --views does not apply to it"),
        (rec + ["--checkpoint", str(models / "cs"), "--task", "inpainting"], "holds measurements of task 'cs', not 'inpainting'"),
        (["reconstruct", "--task", "cs", "--ratio", "0.25", "--block", "8", "--input", str(files / "images"), "--checkpoint",
          str(models / "cs"), "--device", "cpu", "--out", str(files / "images")], "would overwrite the input files"),
        (["reconstruct", "--input", str(files / "masked.h5"), "--checkpoint", str(models / "mri"), "--device", "cpu",
          "--out", str(files)], "is the input's folder"),
        (["simulate", "--task", "cs", "--block", "8", "--input", str(files / "small"), "--device", "cpu", "--out", str(tmp_path / "s.npz")],
         "tiny: the image is 6x20 pixels, smaller than one 8x8 block of the cs operator"),
        (["reconstruct", "--task", "cs", "--input", str(files / "small"), "--checkpoint", str(models / "cs"), "--device", "cpu",
          "--out", str(tmp_path / "o")], "smaller than one 8x8 block"),
        (["benchmark", "--task", "cs", "--block", "8", "--data", str(files / "small"), "--methods", "pinv", "--device", "cpu",
          "--out", str(tmp_path / "o")], "tiny: the image is 6x20 pixels, smaller than one 8x8 block"),  # not scored padded
        (["reconstruct", "--task", "inpainting", "--input", str(files / "small"), "--checkpoint", str(models / "inpainting"),
          "--device", "cpu", "--out", str(tmp_path / "o")], "tiny: the image is 6x20 pixels, too small to score (SSIM's 7x7"),
        (["simulate", "--task", "cs", "--input", str(files / "images"), "--checkpoint", str(models / "mri"), "--device", "cpu",
          "--out", str(tmp_path / "s.npz")], "task: trained for 'mri', requested 'cs'"),
        (["simulate", "--task", "cs", "--input", str(files / "images"), "--device", "cpu", "--out", str(tmp_path / "s.npy")],
         "the measurement file must be F.npz"),
        (["reconstruct", "--input", str(files / "images"), "--device", "cpu", "--out", str(tmp_path / "o")],
         "--task is needed (e.g. --task cs), or a --checkpoint whose training run recorded its task"),
        (["simulate", "--input", str(files / "images"), "--checkpoint", str(bare), "--device", "cpu", "--out", str(tmp_path / "s.npz")],
         "is a bare model folder that records no task"),
        (rec + ["--checkpoint", str(models / "cs"), "--no-crop"], "--no-crop applies to fastMRI .h5 files (their centre crop)"),
        (rec + ["--checkpoint", str(models / "cs"), "--color", "rgb"], "meas.npz was measured from 'y' images; --color rgb does not match"),
        # no model serves a bad flag: the flag is the error (not "no shipped model serves ...")
        (["reconstruct", "--task", "cs", "--ratio", "1.5", "--input", str(files / "images"), "--device", "cpu",
          "--out", str(tmp_path / "o")], "ratio must be in (0, 1], got 1.5"),
        (["reconstruct", "--task", "cs", "--ratio", "0", "--block", "8", "--input", str(files / "images"), "--checkpoint",
          str(models / "cs"), "--device", "cpu", "--out", str(tmp_path / "o")], "ratio must be in (0, 1], got 0.0"),  # also with one
        (["benchmark", "--task", "cs", "--ratio", "0", "--block", "8", "--data", str(files / "images"), "--methods", "idm",
          "--checkpoint", str(models / "cs"), "--device", "cpu", "--out", str(tmp_path / "o")], "ratio must be in (0, 1], got 0.0"),
        (["reconstruct", "--task", "ct", "--views", "0", "--input", str(files / "ct"), "--device", "cpu",
          "--out", str(tmp_path / "o")], "views must be a positive integer, got 0"),
        (["reconstruct", "--task", "ct", "--views", "45", "--input", str(sinogram), "--device", "cpu",
          "--out", str(tmp_path / "o")], "was read as a sinogram of 46 detectors x 45 views"),
        (["benchmark", "--task", "inpainting", "--mask", "nosuch.png", "--data", str(files / "images"), "--methods", "idm",
          "--device", "cpu", "--out", str(tmp_path / "o")], "cannot read mask file 'nosuch.png'"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _error(capsys), argv
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "o").exists()


def test_the_task_defaults_to_the_checkpoints(files, tmp_path):
    """Without --task, simulate, reconstruct and benchmark take the task the checkpoint was trained for (and
    its operator): the same measurements as with --task given."""
    common = ["--input", str(files / "images"), "--checkpoint", str(files / "models" / "cs"), "--device", "cpu", "--no-progress"]
    assert main(["simulate", *common, "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["simulate", *common, "--task", "cs", "--out", str(tmp_path / "b.npz")]) == 0
    a, b = load_measurements(tmp_path / "a.npz"), load_measurements(tmp_path / "b.npz")
    assert a.task == b.task == "cs" and [m.operator for m in a.items] == [m.operator for m in b.items]
    assert all(np.array_equal(x.y, y.y) for x, y in zip(a.items, b.items))
    assert main(["reconstruct", *common, "--out", str(tmp_path / "rec")]) == 0
    assert json.loads((tmp_path / "rec" / "reconstruct.json").read_text())["task"] == "cs"
    bench = ["benchmark", "--data", str(files / "images"), "--checkpoint", str(files / "models" / "cs"), "--methods", "idm",
             "--device", "cpu", "--no-progress", "--no-images", "--out", str(tmp_path / "bench")]  # fmt: skip
    assert main(bench) == 0


def test_per_image_operator_seeds_wrap_at_the_top_of_the_seed_range(files, tmp_path):
    meas = tmp_path / "meas.npz"
    assert main(["simulate", "--task", "inpainting", "--input", str(files / "images"), "--seed", str(2**32 - 1),
                 "--device", "cpu", "--no-progress", "--out", str(meas)]) == 0  # fmt: skip
    assert [m.seed for m in load_measurements(meas).items] == [2**32 - 1, 0]


def test_a_run_that_fails_part_way_says_what_it_wrote(files, tmp_path, capsys):
    """The reconstructions before the failing image stay, and reconstruct.json says the run is incomplete."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes((files / "images" / "a.png").read_bytes())
    whole = (files / "images" / "b.png").read_bytes()
    (images / "z.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    argv = ["reconstruct", "--task", "cs", "--ratio", "0.25", "--block", "8", "--input", str(images), "--checkpoint",
            str(files / "models" / "cs"), "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "z.png" in _error(capsys)
    record = json.loads((out / "reconstruct.json").read_text())
    assert record["complete"] is False and record["written"] == ["a.npy", "a.png", "metrics.csv"] and "z.png" in record["stopped_by"]
    assert [row["name"] for row in _rows(out / "metrics.csv")] == ["a"]  # the score it had is kept

    (images / "a.png").unlink()  # fails before writing anything: the earlier record stays as it was
    assert main(argv) == 2
    assert json.loads((out / "reconstruct.json").read_text()) == record


def test_outputs_never_replace_files_they_did_not_write(files, tmp_path, capsys):
    """simulate refuses to write over its input; reconstruct and benchmark refuse an --out that is a file, or a
    folder of other files (an earlier run's folder may be written again); a failed run leaves no empty folder."""
    slice_npy = tmp_path / "slice.npy"
    slice_npy.write_bytes((files / "ct" / "slice.npy").read_bytes())
    before = slice_npy.read_bytes()
    assert main(["simulate", "--task", "ct", "--views", "20", "--input", str(slice_npy), "--device", "cpu",
                 "--out", str(slice_npy)]) == 2  # fmt: skip
    assert "is one of the input files" in _error(capsys) and slice_npy.read_bytes() == before
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "a.png").write_bytes(b"the user's own")
    cs = ["--task", "cs", "--ratio", "0.25", "--block", "8", "--checkpoint", str(files / "models" / "cs"), "--device", "cpu",
          "--no-progress"]  # fmt: skip
    rec = ["reconstruct", "--input", str(files / "images"), *cs]
    assert main([*rec, "--out", str(keep)]) == 2
    assert "already holds files (a.png) and is not the folder of an earlier `idm reconstruct`" in _error(capsys)
    assert (keep / "a.png").read_bytes() == b"the user's own"
    assert main([*rec, "--out", str(keep / "a.png")]) == 2 and "exists and is not a folder" in _error(capsys)
    bench = ["benchmark", "--data", str(files / "images"), "--methods", "pinv", *cs, "--no-images"]
    assert main([*bench, "--out", str(keep)]) == 2 and "is not the folder of an earlier `idm benchmark`" in _error(capsys)
    fresh = tmp_path / "fresh"
    assert main([*rec, "--out", str(fresh)]) == 0 and main([*rec, "--out", str(fresh)]) == 0  # its own folder again
    failed = tmp_path / "new" / "parents" / "failed"
    assert main(["reconstruct", "--input", str(files / "nokspace.h5"), "--checkpoint", str(files / "models" / "mri"),
                 "--device", "cpu", "--out", str(failed)]) == 2  # fmt: skip
    assert "kspace" in _error(capsys) and not (tmp_path / "new").exists()  # nor the parents it made
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".gitkeep").write_text("")
    assert main([*rec, "--out", str(hidden)]) == 0  # dotfiles are not files it could overwrite
    interrupted = tmp_path / "interrupted"  # a benchmark stopped part-way: its start record and some pictures
    (interrupted / "recon").mkdir(parents=True)
    (interrupted / "benchmark.json").write_text(json.dumps({"command": "idm benchmark ...", "complete": False}))
    assert main([*bench, "--out", str(interrupted)]) == 0
    assert json.loads((interrupted / "benchmark.json").read_text())["complete"] is True


def test_a_shipped_model_plugs_in_at_one_place(files, tmp_path, monkeypatch):
    from idm import shipped

    monkeypatch.setenv(shipped.MODELS_ENV, str(files / "models"))
    assert shipped.default_checkpoint("cs", {"name": "cs", "ratio": 0.25, "block": 8, "mode": "permuted"}) == files / "models" / "cs"
    assert shipped.default_checkpoint("cs", {"name": "cs", "ratio": 0.1, "block": 8}) is None
    assert main(["reconstruct", "--task", "cs", "--ratio", "0.25", "--block", "8", "--input", str(files / "images" / "a.png"),
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "out" / "reconstruct.json").read_text())["checkpoint"] == str(files / "models" / "cs")


def test_mri_and_inpainting_images_are_simulated_and_scored(files, tmp_path):
    for task, model in (("mri", "mri"), ("inpainting", "inpainting")):
        out = tmp_path / task
        assert main(["reconstruct", "--task", task, "--input", str(files / "images" / "a.png"), "--checkpoint",
                     str(files / "models" / model), "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
        assert np.load(out / "a.npy").shape == ((2 if task == "mri" else 3), 32, 32)
        assert Image.open(out / "a.png").mode == ("L" if task == "mri" else "RGB")  # MRI: the magnitude
        assert [r["name"] for r in _rows(out / "metrics.csv")] == ["a"]


# ---- MRI: fastMRI .h5 ------------------------------------------------------------------------
def test_fastmri_file_fully_sampled_is_undersampled_with_a_seeded_mask(files, tmp_path):
    out = tmp_path / "out"
    argv = ["reconstruct", "--task", "mri", "--input", str(files / "mri" / "full.h5"), "--acceleration", "4",
            "--checkpoint", str(files / "models" / "mri"), "--seed", "7", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv + ["--out", str(out)]) == 0
    with h5py.File(out / "full.h5") as f:
        recon, mask = f["reconstruction"][()], f["mask"][()]
        assert recon.shape == (2, 24, 24) and recon.dtype == np.float32  # fastMRI's crop: reconstruction_esc's size
        assert f.attrs["acquisition"] == "AXT2" and f.attrs["idm_scale"] > 0
        assert "max" not in f.attrs  # the input's statistic of its reference images, not of the reconstruction
        assert json.loads(f.attrs["idm_operator"])["seed"] == 7
        assert f.attrs["idm_ensemble"] == 1 and not f.attrs["idm_tall"]  # how it was made
    expected = operators.make("mri", img_size=(32, 32), acceleration=4, center_fraction=0.08, seed=7).mask[0]
    np.testing.assert_array_equal(mask, expected.numpy() != 0)
    assert recon.max() < 1e-2  # back in the file's units (~1e-4), not the normalised [0, 1]
    rows = _rows(out / "metrics.csv")
    assert [r["name"] for r in rows] == ["full_s0", "full_s1"] and all(np.isfinite(float(r["psnr"])) for r in rows)
    assert Image.open(out / "full_s1.png").size == (24, 24)
    # the figures are fastMRI evaluate.py's: one PSNR over the volume, data range its maximum, SSIM its slices' mean
    from skimage.metrics import peak_signal_noise_ratio

    with h5py.File(files / "mri" / "full.h5") as f, h5py.File(out / "full.h5") as g:
        esc, recon = f["reconstruction_esc"][()], g["reconstruction"][()]
    record = json.loads((out / "reconstruct.json").read_text())
    assert record["mean"]["of"] == "volumes" and record["mean"]["count"] == 1
    assert record["mean"]["psnr"] == pytest.approx(peak_signal_noise_ratio(esc, recon, data_range=esc.max()), abs=1e-3)
    assert record["mean"]["ssim"] == pytest.approx(np.mean([float(r["ssim"]) for r in rows]), abs=1e-4)
    # --limit scores its slices against the whole volume's data range: slice 0 scores as in the full run
    assert main(argv + ["--limit", "1", "--out", str(tmp_path / "o1")]) == 0
    assert _rows(tmp_path / "o1" / "metrics.csv")[0]["psnr"] == rows[0]["psnr"]
    # a folder of .h5 files, first slice only, full size
    assert main(["reconstruct", "--input", str(files / "mri"), "--limit", "1", "--no-crop", "--checkpoint",
                 str(files / "models" / "mri"), "--seed", "7", "--device", "cpu", "--out", str(tmp_path / "o2")]) == 0  # fmt: skip
    with h5py.File(tmp_path / "o2" / "full.h5") as f:
        assert f["reconstruction"].shape == (1, 32, 32)
        np.testing.assert_array_equal(f["mask"][()], mask)


def test_fastmri_mask_in_the_file_is_used_as_is(files, tmp_path):
    out = tmp_path / "out"
    assert main(["reconstruct", "--input", str(files / "masked.h5"), "--checkpoint", str(files / "models" / "mri"),
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    with h5py.File(files / "masked.h5") as f, h5py.File(out / "masked.h5") as g:
        np.testing.assert_array_equal(g["mask"][()], f["mask"][()])
        assert g["reconstruction"].shape == (2, 24, 24)  # the header's recon size
        assert json.loads(g.attrs["idm_operator"])["mask_type"] == "given"
    assert not (out / "metrics.csv").exists()  # undersampled at the scanner: no reference


def test_file_masks_are_read_as_columns_only_when_they_are_columns():
    from types import SimpleNamespace

    from tasks import mri_files
    from tasks.data import DataError

    columns = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    for mask in (columns, columns[None], columns[:, None], columns.expand(4, 8)):  # fastMRI's (W,) and broadcasts
        volume = SimpleNamespace(mask=mask, kspace=torch.zeros(1, 4, 8), path="scan.h5")
        assert torch.equal(mri_files.file_mask_columns(volume), columns.double())
    for mask in (columns.reshape(2, 4), torch.stack([columns, 1 - columns])):  # 8 values, but not columns
        volume = SimpleNamespace(mask=mask, kspace=torch.zeros(1, 4, 8), path="scan.h5")
        with pytest.raises(DataError, match=r"scan.h5: 'mask' has shape \(2, "):
            mri_files.file_mask_columns(volume)


def test_fastmri_normalisation_is_undone():
    from tasks import mri_files
    from tasks.data import kspace_to_image

    k = torch.randn(2, 16, 16, dtype=torch.complex64) * 1e-4
    columns = torch.zeros(16, dtype=torch.float64)
    columns[::2] = 1
    scale = mri_files.volume_scale(k, columns)
    y = mri_files.slice_measurements(k, columns, scale)
    op = operators.make("mri", img_size=(16, 16), mask_type="given", columns=columns)
    zero_filled = op.A_dagger(y)
    magnitude = torch.sqrt(zero_filled[:, 0] ** 2 + zero_filled[:, 1] ** 2)
    assert abs(float(magnitude.max()) - 1.0) < 1e-5
    torch.testing.assert_close(magnitude * scale, kspace_to_image(k * columns.float(), crop=None), rtol=1e-4, atol=1e-9)
    from tasks.data import DataError

    for bad, message in ((torch.full_like(k, float("nan")), "scan.h5: k-space contains NaN or inf"),
                         (torch.zeros_like(k), "scan.h5: the measured k-space is all zeros")):  # fmt: skip
        with pytest.raises(DataError, match=message):
            mri_files.volume_scale(bad, columns, source="scan.h5")


def test_bad_fastmri_files_are_clear_errors(files, tmp_path, capsys):
    base = ["reconstruct", "--task", "mri", "--checkpoint", str(files / "models" / "mri"), "--device", "cpu", "--out", str(tmp_path)]
    cases = [
        ("nokspace.h5", "no 'kspace' dataset (found: reconstruction_esc)"),
        ("multicoil.h5", "multi-coil data is not supported yet (single-coil only)"),
    ]
    for name, message in cases:
        assert main(base + ["--input", str(files / name)]) == 2
        assert message in _error(capsys)
    assert main(base[:2] + ["ct"] + base[3:] + ["--input", str(files / "masked.h5")]) == 2
    assert "use --task mri" in _error(capsys)


def test_a_model_trained_with_a_mask_file_serves_that_file(files, tmp_path, capsys):
    """The run records the mask's pixels; the same file (under any path) is that mask, another file is not."""
    keep = np.random.default_rng(3).random((32, 32)) < 0.5
    Image.fromarray((keep * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray((~keep * 255).astype(np.uint8)).save(tmp_path / "other.png")
    config = tasks.get("inpainting").make_operator((32, 32), mask=str(tmp_path / "mask.png")).config()
    model = _model(tmp_path / "models", "inp-file", "inpainting", 3, config)
    argv = ["reconstruct", "--task", "inpainting", "--input", str(files / "images" / "a.png"), "--checkpoint", str(model),
            "--device", "cpu", "--mask"]  # fmt: skip
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "mask.png", tmp_path / "elsewhere" / "copy.png")
    assert main([*argv, str(tmp_path / "elsewhere" / "copy.png"), "--out", str(tmp_path / "same")]) == 0
    assert main([*argv, str(tmp_path / "other.png"), "--out", str(tmp_path / "other")]) == 2
    assert "operator mask: trained with a 32x32 mask array" in _error(capsys)


def test_simulate_replaces_only_its_own_measurement_files(files, tmp_path, capsys):
    """--out may name an earlier idm simulate file (replaced), never a file of the user's (kept, one-line error)."""
    argv = ["simulate", "--task", "ct", "--views", "20", "--input", str(files / "ct" / "slice.npy"), "--device", "cpu", "--out"]
    np.savez(tmp_path / "mine.npz", a=np.arange(5))
    np.save(tmp_path / "mine.npy", np.arange(5))
    for name in ("mine.npz", "mine.npy"):
        before = (tmp_path / name).read_bytes()
        assert main([*argv, str(tmp_path / name)]) == 2
        assert f"{name} exists and was not written by idm simulate" in _error(capsys)
        assert (tmp_path / name).read_bytes() == before
    (tmp_path / "empty.npz").write_bytes(b"")  # mktemp's: nothing to lose
    for name in ("ours.npz", "ours.npy", "empty.npz"):
        assert main([*argv, str(tmp_path / name)]) == 0
        assert main([*argv, str(tmp_path / name)]) == 0, name  # a rerun replaces its own file


def test_fastmri_files_are_checked_when_opened(files, tmp_path, capsys):
    """What the file holds besides k-space is checked before any slice is reconstructed (no output is left)."""
    with h5py.File(files / "mri" / "full.h5") as f:
        kspace, esc = f["kspace"][()], f["reconstruction_esc"][()]
    with h5py.File(tmp_path / "group.h5", "w") as f:
        f.create_group("kspace")
    _write_fastmri(tmp_path / "nanesc.h5", kspace, esc=np.where(esc > esc.mean(), np.nan, esc).astype(np.float32))
    _write_fastmri(tmp_path / "bigesc.h5", kspace, esc=np.full((2, 40, 40), 1e-4, np.float32))
    _write_fastmri(tmp_path / "slices.h5", kspace, esc=esc[:1])
    _write_fastmri(tmp_path / "strmask.h5", kspace, mask=np.array([b"1"] * 32))
    cases = [
        ("group.h5", "'kspace' is an HDF5 group, not a dataset"),
        ("nanesc.h5", "reconstruction_esc holds NaN or infinite values"),
        ("bigesc.h5", "reconstruction_esc images are 40x40; they must fit in the 32x32 k-space image"),
        ("slices.h5", "reconstruction_esc has 1 slices, kspace 2"),
        ("strmask.h5", "'mask' must hold numbers (0/1 or booleans), got dtype |S1"),
    ]
    for name, message in cases:
        out = tmp_path / f"out-{name}"
        assert main(["reconstruct", "--input", str(tmp_path / name), "--checkpoint", str(files / "models" / "mri"),
                     "--device", "cpu", "--out", str(out)]) == 2, name  # fmt: skip
        assert f"{name}: {message}" in _error(capsys) and not out.exists(), name
    # in a folder, every file is checked before the first is reconstructed
    (tmp_path / "folder").mkdir()
    shutil.copy(files / "mri" / "full.h5", tmp_path / "folder" / "a.h5")
    shutil.copy(files / "multicoil.h5", tmp_path / "folder" / "z.h5")
    assert main(["reconstruct", "--input", str(tmp_path / "folder"), "--checkpoint", str(files / "models" / "mri"),
                 "--device", "cpu", "--out", str(tmp_path / "out-folder")]) == 2  # fmt: skip
    assert "z.h5: kspace has shape" in _error(capsys) and not (tmp_path / "out-folder").exists()
    # an impossible operator flag is named as such, also where no model serves it (the k-space gives the size)
    assert main(["reconstruct", "--input", str(files / "mri" / "full.h5"), "--acceleration", "0.5", "--device", "cpu",
                 "--out", str(tmp_path / "acc")]) == 2  # fmt: skip
    assert "acceleration must be a finite number >= 1, got 0.5" in _error(capsys)
    # idm benchmark scores against the fully sampled image: an undersampled file gets a pointer to idm reconstruct,
    # a k-space file given to another task the same
    assert main(["benchmark", "--task", "mri", "--data", str(files / "masked.h5"), "--methods", "pinv",
                 "--device", "cpu", "--out", str(tmp_path / "bm")]) == 2  # fmt: skip
    assert "masked.h5: holds a 'mask'" in (error := _error(capsys)) and "`idm reconstruct --task mri --input" in error
    assert main(["benchmark", "--task", "cs", "--data", str(files / "mri" / "full.h5"), "--methods", "pinv",
                 "--device", "cpu", "--out", str(tmp_path / "bm")]) == 2  # fmt: skip
    assert "full.h5: not an image file" in (error := _error(capsys)) and "`idm reconstruct --input FILE.h5`" in error
    assert not (tmp_path / "bm").exists()


# ---- CT ------------------------------------------------------------------------------------
def test_ct_inputs_resized_dicom_found_and_implausible_values_refused(files, tmp_path, capsys):
    """--size resizes slices before they are measured (simulate and reconstruct; refused for measurements); DICOM
    inputs need no --task; a .npy slice in [0, 1] instead of HU, and all-zero, negated or transposed sinograms, are named."""
    models = files / "models"
    sino = tmp_path / "s16.npy"
    assert main(["simulate", "--input", str(files / "dicom" / "ct.dcm"), "--views", "20", "--size", "16",
                 "--device", "cpu", "--out", str(sino)]) == 0  # fmt: skip  # no --task: a DICOM file is a CT slice
    assert np.load(sino).shape == (23, 20)  # ceil(sqrt(2) * 16) detectors: measured at 16x16
    assert json.loads(sidecar_path(sino).read_text())["resized_to"] == 16
    out = tmp_path / "r16"
    assert main(["reconstruct", "--input", str(files / "dicom"), "--views", "20", "--size", "16", "--checkpoint",
                 str(models / "ct20"), "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    assert np.load(out / "ct.npy").shape == (1, 16, 16)
    assert json.loads((out / "reconstruct.json").read_text())["resized_to"] == 16
    assert "was trained on 32x32 images, these are 16x16" in _error(capsys)
    assert main(["reconstruct", "--input", str(sino), "--size", "16", "--checkpoint", str(models / "ct20"),
                 "--device", "cpu", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--size resizes images before they are measured" in _error(capsys)
    assert main(["simulate", "--input", str(files / "mr.dcm"), "--device", "cpu", "--out", str(tmp_path / "m.npz")]) == 2
    assert "DICOM Modality is 'MR', not 'CT'" in _error(capsys)

    unit = np.load(files / "ct" / "slice.npy").clip(-1024, 3071)
    np.save(tmp_path / "unit.npy", ((unit + 1024) / 4095).astype(np.float32))
    assert main(["simulate", "--task", "ct", "--input", str(tmp_path / "unit.npy"), "--device", "cpu",
                 "--out", str(tmp_path / "u.npy")]) == 2  # fmt: skip
    assert "looks like an image scaled to [0, 1]; convert it to HU first" in _error(capsys)
    # a volume whose last slice is all air: its sinogram is exactly zero, and the volume reconstructs
    volume = np.stack([np.load(files / "ct" / "slice.npy"), np.full((32, 32), -1024, np.int16)])
    np.save(tmp_path / "volume.npy", volume)
    assert main(["simulate", "--task", "ct", "--views", "20", "--input", str(tmp_path / "volume.npy"), "--device", "cpu",
                 "--out", str(tmp_path / "volume_sino.npy")]) == 0  # fmt: skip
    assert not np.load(tmp_path / "volume_sino.npy")[1].any()
    assert main(["reconstruct", "--input", str(tmp_path / "volume_sino.npy"), "--checkpoint", str(models / "ct20"),
                 "--device", "cpu", "--out", str(tmp_path / "volume")]) == 0  # fmt: skip
    rng = np.random.default_rng(0)
    np.save(tmp_path / "zero.npy", np.zeros((46, 20), np.float32))
    np.save(tmp_path / "negated.npy", -rng.random((46, 20)).astype(np.float32))
    np.save(tmp_path / "transposed.npy", rng.random((20, 46)).astype(np.float32))  # (views, detectors)
    for name, message in (("zero.npy", "the sinogram is all zeros"), ("negated.npy", "the sinogram is nowhere positive"),
                          ("transposed.npy", "if it is stored as (views, detectors), transpose it")):  # fmt: skip
        assert main(["reconstruct", "--task", "ct", "--input", str(tmp_path / name), "--checkpoint", str(models / "ct20"),
                     "--device", "cpu", "--out", str(tmp_path / "x")]) == 2, name  # fmt: skip
        assert message in _error(capsys), name


def test_ct_images_in_hounsfield_units_have_a_folder_of_their_own(files, tmp_path):
    """Slices ``a`` and ``a_hu``: each keeps its [0, 1] reconstruction and its image in HU (``a_hu.npy`` beside
    ``a.npy`` would have been overwritten by the second slice's reconstruction)."""
    slices = tmp_path / "slices"
    slices.mkdir()
    hu = np.load(files / "ct" / "slice.npy")
    np.save(slices / "a.npy", hu)
    np.save(slices / "a_hu.npy", np.flip(hu, axis=1).copy())
    out = tmp_path / "out"
    assert main(["reconstruct", "--task", "ct", "--views", "20", "--input", str(slices), "--checkpoint",
                 str(files / "models" / "ct20"), "--device", "cpu", "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    assert sorted(p.name for p in (out / "hu").iterdir()) == ["a.npy", "a_hu.npy"]
    for name in ("a", "a_hu"):
        unit, in_hu = np.load(out / f"{name}.npy"), np.load(out / "hu" / f"{name}.npy")
        assert unit.shape == (1, 32, 32) and in_hu.shape == (32, 32)
        assert np.allclose(in_hu, inverse_hu_window(unit[0], -1024.0, 3071.0), atol=1e-3)


def test_ct_sinogram_simulate_and_reconstruct(files, tmp_path, capsys):
    models = files / "models"
    sino = tmp_path / "sino.npy"
    assert main(["simulate", "--task", "ct", "--input", str(files / "ct" / "slice.npy"), "--views", "20",
                 "--device", "cpu", "--out", str(sino)]) == 0  # fmt: skip
    assert np.load(sino).shape == (46, 20)  # ceil(sqrt(2) * 32) detectors x 20 views
    info = json.loads(sidecar_path(sino).read_text())
    assert info["operator"]["views"] == 20 and info["window"] == [-1024.0, 3071.0] and info["names"] == ["slice"]
    out = tmp_path / "out"
    assert main(["reconstruct", "--task", "ct", "--input", str(sino), "--checkpoint", str(models / "ct20"),
                 "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    assert np.load(out / "slice.npy").shape == (1, 32, 32) and np.load(out / "hu" / "slice.npy").shape == (32, 32)
    assert "was trained on" not in capsys.readouterr().err

    for window in (5, "abc", [0], [1, 2, 3], [100, -100], [True, 2]):  # a hand-edited sidecar's window: named at load
        edited = tmp_path / "edited" / "sino.npy"
        edited.parent.mkdir(exist_ok=True)
        shutil.copy(sino, edited)
        sidecar_path(edited).write_text(json.dumps({**info, "window": window}))
        with pytest.raises(MeasurementFileError, match=r"sino.npy.json: 'window' must be two numbers \[low, high\]"):
            load_sinogram(edited)

    # without the sidecar: the image size comes from the detector count, the views from the last axis
    bare = tmp_path / "bare.npy"
    shutil.copy(sino, bare)
    assert load_sinogram(bare).info is None
    assert main(["reconstruct", "--input", str(bare), "--views", "20", "--checkpoint", str(models / "ct20"),
                 "--device", "cpu", "--out", str(tmp_path / "bare")]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "bare" / "bare.npy"), np.load(out / "slice.npy"))
    capsys.readouterr()
    rec = ["reconstruct", "--task", "ct", "--device", "cpu", "--out", str(tmp_path / "x")]
    cases = [
        ([str(bare), "--views", "30", "--checkpoint", str(models / "ct20")], "the sinogram has 20 views (its last axis), but --views 30"),
        ([str(bare), "--checkpoint", str(models / "ct30")], "the sinogram has 20 views, but checkpoint"),
        ([str(sino), "--checkpoint", str(models / "ct30")], "operator views: trained with 30, requested 20"),
        ([str(sino), "--views", "30", "--checkpoint", str(models / "ct20")], "has 20 views (its last axis), but --views 30"),
        ([str(sino)], "no shipped model serves task 'ct' (views=20"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(rec + ["--input"] + argv) == 2, argv
        assert message in _error(capsys), argv
    np.save(tmp_path / "empty.npy", np.zeros((0, 46, 20), np.float32))
    np.save(tmp_path / "complex.npy", np.zeros((46, 20), np.complex64))
    shutil.copy(sidecar_path(sino), sidecar_path(tmp_path / "named.npy"))
    np.save(tmp_path / "named.npy", np.load(sino))
    info["names"] = ["/tmp/elsewhere"]
    sidecar_path(tmp_path / "named.npy").write_text(json.dumps(info))
    for name, message in (("empty.npy", "with no empty axis, got shape (0, 46, 20)"), ("complex.npy", "must hold real numbers"),
                          ("named.npy", "item name '/tmp/elsewhere' is not a plain file name")):  # fmt: skip
        assert main(rec + ["--input", str(tmp_path / name), "--checkpoint", str(models / "ct20")]) == 2, name
        assert message in _error(capsys), name
    np.save(tmp_path / "odd.npy", np.random.default_rng(0).random((48, 20)).astype(np.float32))
    assert main(rec + ["--input", str(tmp_path / "odd.npy"), "--checkpoint", str(models / "ct20")]) == 2
    assert "48 detector cells match no square image" in _error(capsys)
    np.save(tmp_path / "w33.npy", np.random.default_rng(0).random((47, 20)).astype(np.float32))  # 33x33: padded in the U-Net
    assert main(rec + ["--input", str(tmp_path / "w33.npy"), "--checkpoint", str(models / "ct20"), "--out", str(tmp_path / "w33")]) == 0
    assert np.load(tmp_path / "w33" / "w33.npy").shape == (1, 33, 33)
    # a CT model is tied to its training size: other sizes are reconstructed, with a warning
    assert "was trained on 32x32 images, these are 33x33" in _error(capsys)


def test_ct_dicom_slices(files, tmp_path, capsys):
    models = files / "models"
    meas = tmp_path / "d.npz"
    assert main(["simulate", "--task", "ct", "--views", "20", "--input", str(files / "dicom" / "ct.dcm"), "--keep-truth",
                 "--device", "cpu", "--out", str(meas)]) == 0  # fmt: skip
    npy_meas = tmp_path / "n.npz"
    assert main(["simulate", "--task", "ct", "--views", "20", "--input", str(files / "ct" / "slice.npy"), "--keep-truth",
                 "--device", "cpu", "--out", str(npy_meas)]) == 0  # fmt: skip
    np.testing.assert_array_equal(load_measurements(meas).items[0].y, load_measurements(npy_meas).items[0].y)  # same HU, same sinogram
    assert main(["reconstruct", "--input", str(meas), "--checkpoint", str(models / "ct20"), "--device", "cpu",
                 "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    assert len(_rows(tmp_path / "o" / "metrics.csv")) == 1
    # a folder of DICOM slices: simulated and reconstructed in one go
    assert main(["reconstruct", "--task", "ct", "--input", str(files / "dicom"), "--checkpoint", str(models / "ct20"),
                 "--device", "cpu", "--out", str(tmp_path / "f")]) == 0  # fmt: skip
    assert _rows(tmp_path / "f" / "metrics.csv")[0]["psnr"] == _rows(tmp_path / "o" / "metrics.csv")[0]["psnr"]
    capsys.readouterr()
    assert main(["simulate", "--task", "ct", "--input", str(files / "mr.dcm"), "--device", "cpu", "--out", str(tmp_path / "m.npz")]) == 2
    assert "mr.dcm: DICOM Modality is 'MR', not 'CT' (only CT is supported)" in _error(capsys)


def test_python_m_idm_runs_the_commands(files, tmp_path):
    out = tmp_path / "m.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "idm", "simulate", "--task", "inpainting", "--input", str(files / "images" / "a.png"),
         "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 measurement(s) of task inpainting" in proc.stdout and "no ground truth stored" in proc.stdout
    assert load_measurements(out).items[0].operator["mask"] == "random"


def test_an_output_folder_a_failed_run_only_started_leaves_no_trace(tmp_path):
    """A run that wrote its start record and nothing else is discarded whole, new parents too; one that wrote
    an output keeps its folder, record included, so that the command may write it again."""
    from idm.cli.common import OutputFolder

    folder = OutputFolder(str(tmp_path / "new" / "out"), "benchmark.json", "idm benchmark")
    folder.create()
    folder.start({"complete": False})
    folder.discard_if_empty()
    assert not (tmp_path / "new").exists()
    folder = OutputFolder(str(tmp_path / "kept"), "benchmark.json", "idm benchmark")
    folder.create()
    folder.start({"complete": False})
    (tmp_path / "kept" / "results.csv").write_text("")
    folder.discard_if_empty()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["benchmark.json", "results.csv"]
    folder.check()  # an earlier run's folder: may be written again
