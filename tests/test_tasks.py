"""Task registry and each task's operator and loader, on tiny data written into ``tmp_path``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import tasks
from tasks.base import Schedule, Task
from tasks.data import DataError




def _pngs(folder, n=3, size=20, mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode=mode).save(folder / f"{i}.png")
    return folder


def test_registry():
    assert set(tasks.available()) >= {"cs", "inpainting", "mri", "ct"}
    for name in ("cs", "inpainting", "mri", "ct"):
        task = tasks.get(name)
        assert isinstance(task, Task) and task.name == name and task.description
    with pytest.raises(ValueError, match="unknown task 'deblur'; available: cs, ct, inpainting, mri"):
        tasks.get("deblur")


@pytest.mark.parametrize(
    "name, size, y_shape",
    [("cs", 16, (2, 1, 16, 2)), ("inpainting", 16, (2, 3, 16, 16)), ("mri", 16, (2, 2, 16, 16)), ("ct", 16, None)],
)
def test_make_operator(name, size, y_shape):
    task = tasks.get(name)
    kwargs = {"cs": {"block": 4}, "ct": {"views": 6}}.get(name, {})
    op = task.make_operator((size, size), seed=1, **kwargs)
    x = torch.rand(2, task.channels, size, size)
    y = op.A(x)
    if y_shape is not None:
        assert tuple(y.shape) == y_shape
    assert op.A_adjoint(y).shape == x.shape
    cfg = op.config()
    assert cfg["name"] == task.operator and cfg["img_size"] == [size, size]
    if task.randomized:
        again, other = task.make_operator(size, seed=1, **kwargs), op.resample(2)
        assert torch.equal(again.A(x), y) and not torch.equal(other.A(x), y)


def test_operator_overrides():
    cs = tasks.get("cs")
    assert cs.make_operator(16, ratio=0.3, block=8, mode="spatial").config()["mode"] == "spatial"
    assert cs.make_operator(16, ratio=None, block=8).config()["ratio"] == 0.1  # None = the default
    with pytest.raises(ValueError, match=r"task cs does not use --views \(it takes --ratio, --block, --mode\)"):
        cs.make_operator(16, views=30)
    mri = tasks.get("mri").make_operator(32, acceleration=8, center_fraction=0.04)
    assert mri.config()["acceleration"] == 8
    assert tasks.get("ct").make_operator(16, views=10).config()["views"] == 10
    box = tasks.get("inpainting").make_operator(16, mask="box")
    assert box.resample(5) is box  # nothing random to redraw


def test_image_tasks_load_crops(tmp_path):
    gray, rgb = _pngs(tmp_path / "gray"), _pngs(tmp_path / "rgb", mode="RGB")
    for name, channels in (("cs", 1), ("inpainting", 3)):  # cs: the Y channel; inpainting: RGB (grey files repeated)
        data = tasks.get(name).dataset([gray, rgb], crop=16, seed=0)
        assert len(data) == 6
        x = data[4]
        assert x.shape == (channels, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    color = tasks.get("cs").with_color("rgb")
    assert color.channels == 3 and color.dataset(rgb, crop=8)[0].shape == (3, 8, 8)
    assert color.make_operator(8, block=4).config()["channels"] == 3
    with pytest.raises(DataError, match="larger than every image"):
        tasks.get("cs").dataset(gray, crop=64)
    with pytest.raises(DataError, match="no image files"):
        (tmp_path / "empty").mkdir()
        tasks.get("cs").dataset(tmp_path / "empty")


def test_mri_magnitudes_become_complex(tmp_path):
    pngs = _pngs(tmp_path / "png", n=2)
    mats = tmp_path / "mat"
    mats.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        scipy.io.savemat(mats / f"{i}.mat", {"im_ori": rng.random((24, 24))})
    task = tasks.get("mri")
    data = task.dataset([mats, pngs], crop=16, seed=0)
    assert len(data) == 4
    for i in range(4):
        x = data[i]
        assert x.shape == (2, 16, 16) and torch.all(x[1] == 0) and x[0].max() > 0
    data.set_epoch(1)  # forwarded to the inner loaders
    batch = torch.stack([data[0], data[3]])
    mag = task.metric_image(batch)
    assert mag.shape == (2, 1, 16, 16) and torch.allclose(mag, batch[:, :1])
    with pytest.raises(ValueError, match="--color does not apply"):
        task.with_color("rgb")


def test_ct_slices_are_windowed(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "stack.npy", rng.integers(-1500, 2000, size=(3, 20, 20)).astype(np.int16))
    np.save(folder / "slice.npy", rng.integers(-1000, 1000, size=(20, 20)).astype(np.int16))
    task = tasks.get("ct")
    data = task.dataset(folder, crop=16, seed=0)
    assert len(data) == 4  # every slice of a stack is an item
    x = data[1]
    assert x.shape == (1, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert not task.randomized and task.metric_image(x[None]).shape == (1, 1, 16, 16)


def test_a_new_task_is_one_value():
    task = Task(
        name="cs_spatial_50",
        operator="cs",
        operator_defaults={"ratio": 0.5, "block": 8, "mode": "spatial"},
        options=("ratio",),
        channels=1,
        color="gray",
        crop=32,
        schedule=Schedule(iters=1000, milestones=(0.5,), batch_size=4),
    )
    assert task.schedule.milestone_iterations() == (500,) and task.schedule.milestone_iterations(10) == (5,)
    assert task.make_operator(16).config()["mode"] == "spatial"
    assert task.describe()["operator_defaults"]["ratio"] == 0.5
    with pytest.raises(ValueError, match="gives 3 channel"):
        Task(name="bad", operator="cs", color="rgb", channels=1)
    with pytest.raises(ValueError, match="metric"):
        Task(name="bad", operator="cs", metric="ssim")
    flagless = Task(name="flagless", operator="cs", options=("ratio", "factor"))  # factor: from Python only
    with pytest.raises(ValueError, match=r"task flagless does not use --block \(it takes --ratio\)$"):
        flagless.operator_kwargs(block=8)  # not "--ratio, --factor": no such flag


def test_operator_settings_are_checked_at_the_size_they_will_run():
    """The probe builds the operator as it would run, so a setting valid there is not blamed on a made-up size."""
    tasks.get("mri").check_operator_settings((320, 320), acceleration=16, center_fraction=0.055)  # fine at 320
    with pytest.raises(ValueError, match="keeps 4 central columns of 64"):
        tasks.get("mri").check_operator_settings((64, 64), acceleration=16, center_fraction=0.055)
    tasks.get("cs").check_operator_settings((20, 30), block=8)  # padded to whole blocks first: 24 x 32
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], got 1.5"):
        tasks.get("cs").check_operator_settings((20, 30), ratio=1.5)
    tasks.get("cs").check_operator_settings(None, ratio=1.5)  # no size: nothing is built, nothing claimed


def test_a_flag_the_operator_would_ignore_is_refused(tmp_path):
    """--ratio beside --mask box (or a mask file) would change nothing: refused, by name, in every command and for
    a training range; inside a mixture of mask kinds it applies to the random ones."""
    from idm.cli import main

    task = tasks.get("inpainting")
    assert task.check_flags(ratio=0.3) == {"mask": "random", "ratio": 0.3}
    assert task.check_flags(mask="box")["mask"] == "box"  # the task's default ratio is not the user's
    with pytest.raises(ValueError, match="--ratio does not apply here: ratio sets the kept fraction of random masks; "
                       "mask='box' does not use it"):  # fmt: skip
        task.check_flags(mask="box", ratio=0.3)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(mask)
    with pytest.raises(ValueError, match="a mask of given pixels does not use it"):
        task.check_flags(mask=str(mask), ratio=0.3)
    with pytest.raises(ValueError, match="--ratio 0.2:0.4 would change nothing: the inpainting operator does not use it with mask='box'"):
        task.make_training_operator(16, mask="box", ratio=(0.2, 0.4))
    family = task.make_training_operator(16, mask="random,box", ratio=(0.2, 0.4))
    assert [sorted(c.vary) for c in family.components] == [["ratio"], ["box_position"]]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    argv = ["--task", "inpainting", "--mask", "box", "--ratio", "0.2", "--device", "cpu"]
    assert main(["simulate", *argv, "--input", str(tmp_path / "a.png"), "--out", str(tmp_path / "s.npz")]) == 2
    assert main(["benchmark", *argv, "--data", str(tmp_path / "a.png"), "--methods", "pinv", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "b").exists()
