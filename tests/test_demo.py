"""``idm demo``: shipped models found by what they serve, run on bundled sample images."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import tasks
from idm import IDM, IDMConfig, demo
from idm.cli import main

#: Least PSNR gain (dB) of the shipped models over A^+ y on the first sample image, a floor below what
#: the shipped weights reach (see idm/weights/README.md), so a broken model or loader fails the test.
#: Measured with the weights shipped now: 15.8, 18.2 (cs-20), 22.9, 20.8, 6.5, 3.2, 3.6 and 4.6 dB (ct-18 was 1.2 dB
#: below FBP on the phantom before its least-squares final projection; the tiled inpainting model
#: before the per-channel one had 13.9).
SHIPPED_MIN_GAIN_DB = {"cs-10": 12.0, "cs-20": 14.0, "cs-50": 15.0, "inpainting-50-missing": 10.0, "mri-4x": 4.0, "mri-8x": 1.0,
                       "ct-60": 1.5, "ct-18": 2.0}


def _shipped(root, name, task, color, channels, operator_config):
    folder = root / name
    torch.manual_seed(0)
    IDM(IDMConfig(unet="tiny", image_channels=channels, steps=1)).save_pretrained(folder)
    task_info = {"color": color, "channels": channels}
    run = {"format": "idm-train-run", "identity": {"task": task, "operator": operator_config, "task_info": task_info}}
    (folder / "run.json").write_text(json.dumps(run))


def test_sample_images_ship_with_the_install():
    gray = demo.sample_images("y")
    rgb = demo.sample_images("rgb")
    assert [im.name for im in gray] == list(demo.SAMPLE_IMAGES)
    assert [im.name for im in rgb] == ["astronaut", "coffee"]  # the grey photograph is left out
    assert all(im.x.shape == (1, 256, 256) for im in gray) and all(im.x.shape == (3, 256, 256) for im in rgb)
    assert all(0 <= float(im.x.min()) and float(im.x.max()) <= 1 for im in gray + rgb)


def test_phantom_for_mri_is_complex_with_zero_imaginary_part():
    grey, complex_ = demo.phantom_image(1, size=64).x, demo.phantom_image(2, size=64).x
    assert grey.shape == (1, 64, 64) and complex_.shape == (2, 64, 64)
    assert torch.equal(complex_[:1], grey) and not complex_[1].any()
    assert 0 <= float(grey.min()) and float(grey.max()) <= 1 and float(grey.max()) > 0.5
    with pytest.raises(ValueError, match="1 or 2"):
        demo.phantom_image(3)


def test_demo_runs_every_shipped_model_and_skips_settings_without_one(tmp_path, monkeypatch, capsys):
    from idm import shipped

    models = tmp_path / "models"
    cs = tasks.get("cs").make_training_operator(64, ratio=(0.05, 0.35)).config()
    inp = tasks.get("inpainting").with_color("rgb").make_training_operator(64, ratio=(0.15, 0.6), mask="random,box").config()
    _shipped(models, "cs-any", "cs", "y", 1, cs)
    _shipped(models, "inpainting-rgb", "inpainting", "rgb", 3, inp)
    monkeypatch.setenv(shipped.MODELS_ENV, str(models))
    small = {c: [im for im in demo.sample_images(c, size=64)][:2] for c in ("y", "rgb")}
    monkeypatch.setattr(demo, "sample_images", lambda color: small[color])

    out = tmp_path / "demo"
    assert main(["demo", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| cs-10 | cs-any (y) | idm |" in printed and "| inpainting-box | inpainting-rgb (rgb) | pinv |" in printed
    assert "No shipped model for: cs-50, mri-4x, mri-8x, ct-60, ct-18." in printed  # 0.5 is outside the 0.05..0.35 family
    assert (out / "demo.png").is_file() and (out / "demo.md").read_text() in printed and "Total time" in printed
    rows = list(csv.DictReader(open(out / "cs-30" / "results.csv")))
    assert {r["method"] for r in rows} == {"pinv", "idm"} and all(r["status"] == "ok" for r in rows)
    assert (out / "inpainting-80-missing" / "grids" / "astronaut.png").is_file()


def test_demo_without_any_shipped_model_says_so(tmp_path, capsys):
    assert main(["demo", "--device", "cpu", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "no shipped model is installed" in capsys.readouterr().err


def test_demo_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["demo", "--device", "cpu", "--out", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.strip() == f"idm demo: error: --out {tmp_path / 'afile'} is a file; the demo writes a folder"


def test_demo_refuses_a_folder_of_other_files_and_takes_an_earlier_demos(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["demo", "--device", "cpu", "--out", str(mine), "--no-progress"]) == 2
    assert "holds files the demo does not write (notes.txt)" in capsys.readouterr().err
    earlier = tmp_path / "earlier"
    (earlier / "cs-10").mkdir(parents=True)  # a demo stopped part-way: the folder check passes (no model is shipped here)
    assert main(["demo", "--device", "cpu", "--out", str(earlier), "--no-progress"]) == 2
    assert "no shipped model is installed" in capsys.readouterr().err


@pytest.mark.shipped
def test_the_shipped_models_load_and_serve_their_settings():
    from idm.shipped import find_shipped, shipped_models

    models = shipped_models()
    if not models:
        pytest.skip("no weights in idm/weights")
    for case in demo.DEMO_CASES:
        task = tasks.get(case.task)
        model = find_shipped(task.name, {"name": task.operator, **task.operator_kwargs(**case.overrides)})
        assert model is not None, case
        weights = model.path / "model.safetensors"
        assert weights.stat().st_size < 16 * 2**20


@pytest.mark.shipped
def test_the_shipped_model_is_chosen_by_what_it_serves():
    from idm.shipped import find_shipped, missing_message

    def chosen(task_name, channels=None, **flags):
        task = tasks.get(task_name)
        model = find_shipped(task.name, {"name": task.operator, **task.operator_kwargs(**flags)}, channels)
        return model and model.name

    assert chosen("cs", ratio=0.3) == chosen("cs", ratio=0.30000001) == "cs-30"  # 0.3 after a float32 round trip
    assert chosen("cs", ratio=0.31) == "cs-ratio-1-50"
    assert chosen("mri", acceleration=8, center_fraction=0.04) == "mri-8x"
    assert chosen("mri", acceleration=8) is None  # the default centre, 8 %, is not what mri-8x was trained with
    assert chosen("inpainting", channels=3) == "inpainting-rgb" and chosen("cs", channels=3) is None
    request = {"name": "mri", **tasks.get("mri").operator_kwargs(acceleration=8, center_fraction=0.08)}
    assert "mri-8x: operator center_fraction: trained with 0.04, requested 0.08" in missing_message("mri", request, 2)


def test_a_model_of_other_colours_does_not_serve_a_request(tmp_path, monkeypatch):
    """A grey inpainting model in $IDM_MODELS_DIR does not take RGB requests from the shipped RGB model."""
    from idm import shipped

    models = tmp_path / "models"
    config = tasks.get("inpainting").with_color("y").make_operator((32, 32)).config()
    _shipped(models, "inpainting-y", "inpainting", "y", 1, config)
    monkeypatch.setenv(shipped.MODELS_ENV, str(models))
    request = {"name": "inpainting", **tasks.get("inpainting").operator_kwargs()}
    assert shipped.find_shipped("inpainting", request, 3) is None
    assert shipped.find_shipped("inpainting", request, 1).name == "inpainting-y"
    assert "inpainting-y: reconstructs 1-channel images, not 3" in shipped.missing_message("inpainting", request, 3)


def _shipped_psnr_gain(case: demo.DemoCase) -> tuple[float, float]:
    """``(IDM PSNR, A^+ y PSNR)`` of the shipped model for a demo setting on its first sample image."""
    from benchmarks.protocol import operator_factory, score_function
    from idm.shipped import find_shipped
    from idm.train import load_trained

    task = tasks.get(case.task)
    shipped = find_shipped(task.name, {"name": task.operator, **task.operator_kwargs(**case.overrides)})
    assert shipped is not None, case
    if shipped.color and shipped.color != task.color:
        task = task.with_color(shipped.color)
    trained = load_trained(shipped.path, operator_defaults=task.operator_kwargs())
    image = demo.phantom_image(task.channels) if case.images == "phantom" else demo.sample_images(task.color)[0]
    x = image.x[None]
    op = operator_factory(task, dict(case.overrides), trained.operator, seed=0)(0, tuple(x.shape[-2:]))
    y = op.A(x)
    with torch.no_grad():
        x_hat = trained.model.eval()(y, op)
    score = score_function(task)
    return score(x_hat, x)[0], score(op.A_dagger(y), x)[0]


@pytest.mark.shipped
@pytest.mark.parametrize("label", sorted(SHIPPED_MIN_GAIN_DB))
def test_shipped_models_beat_the_pseudo_inverse(label):
    from idm.shipped import shipped_models

    if not shipped_models():
        pytest.skip("no weights in idm/weights")
    idm_psnr, pinv_psnr = _shipped_psnr_gain(next(c for c in demo.DEMO_CASES if c.label == label))
    assert idm_psnr > pinv_psnr + SHIPPED_MIN_GAIN_DB[label], (idm_psnr, pinv_psnr)


@pytest.mark.shipped
def test_shipped_names_load_from_python_as_on_the_command_line():
    """``IDM.from_pretrained("cs-10")`` and ``IDMConfig(unet="prior-natural-y")`` take the names the CLI takes."""
    from idm.checkpoint import CheckpointError

    model = IDM.from_pretrained("cs-10")
    assert model.config.unet == "prior-natural-y" and model.config.steps == 3
    fresh = IDM(IDMConfig(unet="prior-natural-y", image_channels=1, steps=1))
    assert sum(p.numel() for p in fresh.parameters()) > 1e6
    with pytest.raises(CheckpointError, match="nor is it the name of a shipped model"):
        IDM.from_pretrained("cs-11")
