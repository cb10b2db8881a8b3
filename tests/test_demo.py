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
SHIPPED_MIN_GAIN_DB = {"cs-10": 10.0, "cs-50": 13.0, "inpainting-50": 7.0}  # measured: 13.4, 17.0, 10.2


def _shipped(root, name, task, color, channels, operator_config):
    folder = root / name
    torch.manual_seed(0)
    IDM(IDMConfig(unet="tiny", image_channels=channels, steps=1)).save_pretrained(folder)
    run = {"format": "idm-train-run", "identity": {"task": task, "operator": operator_config, "task_info": {"color": color}}}
    (folder / "run.json").write_text(json.dumps(run))


def test_sample_images_ship_with_the_install():
    gray = demo.sample_images("y")
    rgb = demo.sample_images("rgb")
    assert [im.name for im in gray] == list(demo.SAMPLE_IMAGES)
    assert [im.name for im in rgb] == ["astronaut", "coffee"]  # the grey photograph is left out
    assert all(im.x.shape == (1, 256, 256) for im in gray) and all(im.x.shape == (3, 256, 256) for im in rgb)
    assert all(0 <= float(im.x.min()) and float(im.x.max()) <= 1 for im in gray + rgb)


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
    assert "No shipped model for: cs-50." in printed  # 0.5 is outside the 0.05..0.35 family
    assert (out / "demo.png").is_file() and (out / "demo.md").read_text() in printed and "Total time" in printed
    rows = list(csv.DictReader(open(out / "cs-30" / "results.csv")))
    assert {r["method"] for r in rows} == {"pinv", "idm"} and all(r["status"] == "ok" for r in rows)
    assert (out / "inpainting-80-missing" / "grids" / "astronaut.png").is_file()


def test_demo_without_any_shipped_model_says_so(tmp_path, capsys):
    assert main(["demo", "--device", "cpu", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
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


def _shipped_psnr_gain(task_name: str, overrides: dict, color: str) -> tuple[float, float]:
    """``(IDM PSNR, A^+ y PSNR)`` of the shipped model for a setting on the first sample image."""
    from benchmarks.protocol import operator_factory, score_function
    from idm.shipped import find_shipped
    from idm.train import load_trained

    task = tasks.get(task_name).with_color(color)
    shipped = find_shipped(task.name, {"name": task.operator, **task.operator_kwargs(**overrides)})
    assert shipped is not None, overrides
    trained = load_trained(shipped.path, operator_defaults=task.operator_kwargs())
    x = demo.sample_images(color)[0].x[None]
    op = operator_factory(task, overrides, trained.operator, seed=0)(0, tuple(x.shape[-2:]))
    y = op.A(x)
    with torch.no_grad():
        x_hat = trained.model.eval()(y, op)
    score = score_function(task)
    return score(x_hat, x)[0], score(op.A_dagger(y), x)[0]


@pytest.mark.shipped
@pytest.mark.parametrize(
    ("task_name", "overrides", "color", "min_gain_db"),
    [("cs", {"ratio": 0.1}, "y", SHIPPED_MIN_GAIN_DB["cs-10"]), ("cs", {"ratio": 0.5}, "y", SHIPPED_MIN_GAIN_DB["cs-50"]),
     ("inpainting", {"mask": "random", "ratio": 0.5}, "rgb", SHIPPED_MIN_GAIN_DB["inpainting-50"])],
)  # fmt: skip
def test_shipped_models_beat_the_pseudo_inverse(task_name, overrides, color, min_gain_db):
    from idm.shipped import shipped_models

    if not shipped_models():
        pytest.skip("no weights in idm/weights")
    idm_psnr, pinv_psnr = _shipped_psnr_gain(task_name, overrides, color)
    assert idm_psnr > pinv_psnr + min_gain_db, (idm_psnr, pinv_psnr)
