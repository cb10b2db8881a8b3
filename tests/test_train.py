"""``idm train``: exact resume, DDP == single process, atomic checkpoints, time budget, bad input.

Everything runs on the CPU with the tiny U-Net on 16x16 crops of small
random PNGs written into ``tmp_path``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from idm import IDM, IDMConfig
from idm.checkpoint import CheckpointError
from idm.cli import main
from idm.train import load_trained, make_optimizer, resolve_model_dir, scalar_parameter_names
from idm.training.batches import ShardedBatches
from idm.training.optimizer import fused_by_default
from idm.training.state import flatten_optimizer, restore_optimizer
from tasks.data import ImageFolderDataset
from tests.conftest import relative_error

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "train", "--task", "cs", "--ratio", "0.25", "--block", "8", "--unet", "tiny", "--steps", "1",
    "--crop", "16", "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--no-progress",
    "--log-every", "1",
]  # fmt: skip


def write_images(folder: Path, n: int = 5, size: int = 24, seed: int = 0) -> Path:
    """``n`` smooth random grayscale PNGs of ``size`` x ``size``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = rng.random((size // 4, size // 4))
        img = np.kron(a, np.ones((4, 4)))
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def weights(out: Path, iteration: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"iter_{iteration:07d}" / name))


def read_log(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "train")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data) -> Path:
    """A finished 2-iteration run with a checkpoint after each iteration."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main([*BASE, "--data", str(data), "--iters", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


# ---------------------------------------------------------------------------------------------
def test_help_works_as_python_module():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "idm", "train", "--help"], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--resume", "--max-minutes", "--prior", "--ratio", "--device", "--seed", "--out", "--scalar-lr-mult"):
        assert flag in proc.stdout


def test_python_m_idm_names_a_file_of_the_current_folder_that_hides_a_toolkit_package(tmp_path):
    """python -m idm puts the current folder first on sys.path, where a user's operators.py or tasks/ would be
    imported in place of the toolkit's packages: one line names it (python -P -m idm leaves the folder out)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "operators.py").write_text("raise SystemExit('the shadowing module ran')\n")
    proc = subprocess.run([sys.executable, "-m", "idm", "--version"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"idm needs its own 'operators' package ({REPO / 'operators' / '__init__.py'}), but 'operators' resolves to "
            f"{tmp_path / 'operators.py'}") in proc.stderr  # found, not run
    (tmp_path / "operators.py").unlink()
    (tmp_path / "tasks").mkdir()  # a plain folder (a namespace package) hides it as well; the commands need it
    proc = subprocess.run([sys.executable, "-m", "idm", "--version"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "idm: error: idm needs its own 'tasks' package" in proc.stderr
    assert f"'tasks' resolves to {tmp_path / 'tasks'}:" in proc.stderr and "Traceback" not in proc.stderr
    script = "import idm; print(idm.IDM.__name__)"  # a script that only uses the model does not need tasks
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "IDM", proc.stderr
    proc = subprocess.run([sys.executable, "-P", "-m", "idm", "--version"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("idm "), proc.stderr


def test_resume_is_exact(tmp_path, data):
    common = [*BASE, "--data", str(data), "--checkpoint-every", "4", "--lr-milestones", "5", "15"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--iters", "20", "--out", str(straight)]) == 0
    assert main([*common, "--iters", "10", "--out", str(split)]) == 0
    assert main([*common, "--iters", "20", "--out", str(split), "--resume"]) == 0
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = weights(straight, 20, name), weights(split, 20, name)
        assert a.keys() == b.keys() and len(a) > 10
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(weights(straight, 20)["schedule.alpha"], torch.full((1,), 0.5))

    # the CSV log: its columns, and the resumed run's rows up to the checkpoint are kept
    with open(split / "log.csv") as handle:
        assert handle.readline().strip() == "iteration,loss,lr,val_psnr,seconds"
    rows_a, rows_b = read_log(straight), read_log(split)
    assert [r["iteration"] for r in rows_a] == [str(i) for i in range(1, 21)]
    assert [r["iteration"] for r in rows_b] == [str(i) for i in range(1, 21)]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [rows_a[i]["lr"] for i in (4, 5, 14, 15)] == ["0.0001", "5e-05", "5e-05", "2.5e-05"]
    assert all(r["val_psnr"] == "" for r in rows_a)
    assert float(rows_b[-1]["seconds"]) >= float(rows_b[9]["seconds"])
    kept = sorted(p.name for p in (split / "checkpoints").iterdir())
    assert kept == ["iter_0000016", "iter_0000020"]  # --keep 2


def test_a_prior_with_dropout_resumes_exactly_with_plain_autograd(tmp_path, data):
    """Its dropout draws from the global RNG, which a resumed run restores: the data loader must not draw from it
    (its workers' base seed) after that, or every later mask differs from the uninterrupted run's."""
    from diffusers import UNet2DModel

    from idm.unets import tiny_unet_config

    prior = tmp_path / "prior"
    UNet2DModel(**{**tiny_unet_config(1), "dropout": 0.1}).save_pretrained(prior)
    common = [a for a in BASE if a not in ("--unet", "tiny")]
    common = [*common, "--prior", str(prior), "--no-recompute", "--data", str(data), "--checkpoint-every", "2",
              "--lr-milestones", "1", "3"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--iters", "4", "--out", str(straight)]) == 0
    assert main([*common, "--iters", "2", "--out", str(split)]) == 0
    assert main([*common, "--iters", "4", "--out", str(split), "--resume"]) == 0
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        a, b = weights(straight, 4, name), weights(split, 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_validation_of_a_noise_init_model_resumes_exactly(tmp_path, data):
    val = write_images(tmp_path / "val", n=2, size=16, seed=5)
    common = [*BASE, "--data", str(data), "--init", "noise", "--val-data", str(val), "--val-every", "1", "--lr-milestones", "100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--iters", "4", "--out", str(straight)]) == 0
    assert main([*common, "--iters", "2", "--out", str(split)]) == 0
    assert main([*common, "--iters", "4", "--out", str(split), "--resume"]) == 0
    scores = [[r["val_psnr"] for r in read_log(run)] for run in (straight, split)]
    assert scores[0] == scores[1] and all(scores[0])  # its own start noise, not the global RNG's next draw


@pytest.mark.parametrize("init, micro_batch", [("pinv", []), ("noise", []), ("noise", ["--micro-batch", "1"])])
def test_ddp_two_processes_equal_one_process(tmp_path, data, init, micro_batch):
    """noise: drawn for the global batch, each rank takes its slice; --micro-batch: each rank's two images one
    at a time, the gradients averaged over the ranks after the second (idm.training.micro_batches)."""
    common = [*BASE[1:], "--data", str(data), "--iters", "2", "--batch-size", "4", "--lr", "1e-5", "--checkpoint-every", "2",
              "--init", init]  # fmt: skip
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert torch.get_num_threads() == 1  # as each torchrun process (the same summation order)
    assert main(["train", *common, "--out", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "idm", "train", *common,
           *micro_batch, "--out", str(ddp)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("idm train: done") == 1  # rank 0 only
    a, b = weights(single, 2), weights(ddp, 2)
    torch.manual_seed(0)  # the run's seed: the same initial weights
    start = IDM(IDMConfig(unet="tiny", steps=1))
    assert max((a[k] - start.state_dict()[k]).abs().max().item() for k in a if "unet" in k) > 5e-6  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    for ra, rb in zip(read_log(single), read_log(ddp)):
        assert abs(float(ra["loss"]) - float(rb["loss"])) <= 1e-6
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["iter_0000002"]


def test_max_minutes_stops_after_one_iteration_and_checkpoints(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--data", str(data), "--iters", "50", "--max-minutes", "0.001", "--out", str(out)]) == 0
    message = capsys.readouterr().out
    assert "stopped by the time budget" in message and "iteration 1 of 50" in message and "--resume" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_0000001"]
    assert [r["iteration"] for r in read_log(out)] == ["1"]


def test_validation_psnr_is_logged(tmp_path, data):
    val = write_images(tmp_path / "val", n=2, size=20, seed=5)
    out = tmp_path / "run"
    args = [*BASE, "--data", str(data), "--iters", "2", "--val-data", str(val), "--val-every", "2", "--out", str(out)]
    assert main(args) == 0
    rows = read_log(out)
    assert rows[0]["val_psnr"] == "" and 3.0 < float(rows[1]["val_psnr"]) < 60.0


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, data, monkeypatch, capsys):
    import idm.training.state as state_module  # writes the optimizer state of every checkpoint

    real = state_module.save_tensors
    calls = []

    def crash_on_second_optimizer_write(tensors, path, metadata=None):
        if Path(path).name == "optimizer.safetensors":
            calls.append(path)
            if len(calls) == 2:
                raise OSError("No space left on device (simulated)")
        return real(tensors, path, metadata)

    monkeypatch.setattr(state_module, "save_tensors", crash_on_second_optimizer_write)
    out = tmp_path / "run"
    args = [*BASE, "--data", str(data), "--iters", "3", "--checkpoint-every", "1", "--out", str(out)]
    assert main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_0000001"]  # no half-written folder left
    assert load_trained(out).path.name == "iter_0000001"
    monkeypatch.setattr(state_module, "save_tensors", real)
    assert main([*args, "--resume"]) == 0
    assert resolve_model_dir(out).name == "iter_0000003"


def test_load_trained_checks_task_and_operator(base_run, tmp_path):
    latest = base_run / "checkpoints" / "iter_0000002"
    assert resolve_model_dir(base_run) == latest and resolve_model_dir(latest) == latest
    trained = load_trained(base_run, expect_task="cs", expect_operator={"name": "cs", "ratio": 0.25, "img_size": [64, 64]})
    assert isinstance(trained.model, IDM) and trained.task == "cs" and trained.operator["ratio"] == 0.25
    with pytest.raises(CheckpointError, match=r"operator ratio: trained with 0.25, requested 0.1"):
        load_trained(base_run, expect_task="cs", expect_operator={"ratio": 0.1})
    with pytest.raises(CheckpointError, match="task: trained for 'cs', requested 'mri'"):
        load_trained(base_run, expect_task="mri")
    bare = IDM(IDMConfig(unet="tiny", steps=1)).save_pretrained(tmp_path / "bare")
    assert load_trained(bare, expect_task="mri").run is None  # no metadata: nothing to check
    with pytest.raises(CheckpointError, match="neither an IDM model folder"):
        resolve_model_dir(tmp_path)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        resolve_model_dir(tmp_path / "empty")


# ---- bad input: a clear error, nothing written or overwritten --------------------------------
def _fails(args: list[str], capsys, match: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("idm train: error:") and match in err, err
    return err


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    _fails([*BASE, "--data", str(tmp_path / "empty"), "--iters", "2", "--out", str(out)], capsys, "no image files")
    assert not out.exists()


def test_validation_cadence_without_validation_images(tmp_path, capsys):
    out = tmp_path / "run"
    _fails([*BASE, "--data", str(write_images(tmp_path / "d", n=2)), "--iters", "2", "--val-every", "1", "--out", str(out)],
           capsys, "--val-every sets how often to validate on --val-data, which is not given")  # fmt: skip
    assert not out.exists()


def test_a_validation_image_smaller_than_the_crop_is_named(tmp_path, data, capsys):
    small = write_images(tmp_path / "small", n=1, size=12)
    out = tmp_path / "run"
    err = _fails([*BASE, "--data", str(data), "--iters", "2", "--val-data", str(small), "--out", str(out)], capsys,
                 "is 12x12, smaller than the training crop 16x16")  # fmt: skip
    assert "validation image img00" in err and not out.exists()


def test_the_toolkits_warnings_print_as_one_line(tmp_path, capsys):
    """Images smaller than the crop are skipped with a warning: one line named after the command, no source line."""
    images = write_images(tmp_path / "d", n=3)
    (write_images(tmp_path / "s", n=1, size=12) / "img00.png").rename(images / "small.png")  # below the 16x16 crop
    assert main([*BASE, "--data", str(images), "--iters", "1", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "idm train: warning: 1 of 4 images are smaller than the crop 16x16 and are skipped" in err, err
    assert "UserWarning" not in err and "warnings.warn(" not in err


def test_unreadable_image(tmp_path, capsys):
    bad = write_images(tmp_path / "bad", n=2)
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "run"
    _fails([*BASE, "--data", str(bad), "--iters", "2", "--out", str(out)], capsys, "broken.png")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "pretrain", "demo", "simulate", "reconstruct", "benchmark"])
def test_seeds_outside_what_the_random_sources_take_are_usage_errors(command, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([command, "--seed", str(2**64), "--out", str(tmp_path / "o")])
    assert f"argument --seed: must be in [0, 2**32), got {2**64}" in capsys.readouterr().err


def test_validation_limit_must_be_positive(tmp_path, data, capsys):
    with pytest.raises(SystemExit):
        main([*BASE, "--data", str(data), "--val-max", "0", "--out", str(tmp_path / "o")])
    assert "argument --val-max: must be at least 1, got 0" in capsys.readouterr().err


def test_crop_smaller_than_a_cs_block(tmp_path, data, capsys):
    out = tmp_path / "run"
    _fails([*BASE, "--data", str(data), "--crop", "4", "--iters", "2", "--out", str(out)], capsys,
           "--crop 4 is smaller than one 8x8 block of the cs operator")  # fmt: skip
    assert not out.exists()


def test_a_crop_of_height_by_width_trains_on_batches_of_that_shape(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--data", str(data), "--crop", "16x24", "--iters", "3", "--checkpoint-every", "3", "--out", str(out)]) == 0
    trained = load_trained(out)
    run = json.loads((out / "checkpoints" / "iter_0000003" / "run.json").read_text())
    assert run["identity"]["task_info"]["crop"] == [16, 24] and trained.operator["img_size"] == [16, 24]
    shards = ShardedBatches(ImageFolderDataset(str(data), color="gray", crop=(16, 24)), 2, seed=0)
    assert {tuple(shards[i].shape[-2:]) for i in range(12)} == {(16, 24)}  # flipped, never turned a quarter
    assert main([*BASE, "--data", str(data), "--crop", "16x16", "--iters", "1", "--out", str(tmp_path / "square")]) == 0
    square = json.loads((tmp_path / "square" / "checkpoints" / "iter_0000001" / "run.json").read_text())
    assert square["identity"]["task_info"]["crop"] == 16  # a square is recorded as before
    for bad in ("16x", "x16", "16x24x3", "0x16", "a"):
        with pytest.raises(SystemExit):
            main([*BASE, "--data", str(data), "--crop", bad, "--out", str(tmp_path / "bad")])
        assert "argument --crop: must be a size S or HxW" in capsys.readouterr().err
    _fails([*BASE, "--data", str(data), "--crop", "4x16", "--iters", "2", "--out", str(tmp_path / "thin")], capsys,
           "--crop 4x16 is smaller than one 8x8 block of the cs operator")  # fmt: skip


def test_several_crops_take_turns_one_per_iteration_and_resume_exactly(tmp_path, data, capsys):
    common = [*BASE, "--data", str(data), "--crop", "16", "16x24", "--checkpoint-every", "3", "--lr-milestones", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--iters", "6", "--out", str(straight)]) == 0
    assert main([*common, "--iters", "3", "--out", str(split)]) == 0
    assert main([*common, "--iters", "6", "--out", str(split), "--resume"]) == 0
    a, b = weights(straight, 6), weights(split, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((straight / "checkpoints" / "iter_0000006" / "run.json").read_text())
    assert run["identity"]["task_info"]["crop"] == [[16, 16], [16, 24]]  # pairs: never read as one 16x24 crop
    assert [size["operator"]["img_size"] for size in run["identity"]["more_sizes"]] == [[16, 24]]
    assert load_trained(straight).operator["img_size"] == [16, 16]  # the first size's, as reconstruct rebuilds it
    square, wide = (ImageFolderDataset(str(data), color="gray", crop=c) for c in (16, (16, 24)))
    shards = ShardedBatches(square, 2, seed=0, more_datasets=[wide])
    assert [tuple(shards[i].shape[-2:]) for i in range(6)] == [(16, 16), (16, 24)] * 3
    assert torch.equal(shards[2], ShardedBatches(square, 2, seed=0)[2])  # the square turns draw as a run of one size
    before = snapshot(split)
    err = _fails([*BASE, "--data", str(data), "--crop", "16x24", "16", "--iters", "9", "--out", str(split), "--resume"],
                 capsys, "different configuration")  # fmt: skip
    assert "task_info.crop" in err and snapshot(split) == before


def test_several_crops_bad_input(tmp_path, data, capsys):
    _fails([*BASE, "--data", str(data), "--crop", "16", "16x16", "--iters", "2", "--out", str(tmp_path / "twice")],
           capsys, "--crop names a size twice (16 16); give each size once")  # fmt: skip
    _fails([*BASE, "--data", str(data), "--crop", "16", "4x16", "--iters", "2", "--out", str(tmp_path / "thin")], capsys,
           "--crop 4x16 is smaller than one 8x8 block of the cs operator")  # fmt: skip
    mixed = write_images(tmp_path / "mixed", n=3, size=24)
    write_images(tmp_path / "big", n=2, size=32, seed=1)
    for image in (tmp_path / "big").iterdir():
        image.rename(mixed / f"big-{image.name}")
    out = tmp_path / "run"
    assert main([*BASE, "--data", str(mixed), "--crop", "16", "32", "--iters", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err  # the size that leaves images out is named by its warning, then the error
    assert "idm train: warning: 3 of 5 images are smaller than the crop 32x32 and are skipped" in err
    assert ("idm train: error: the training images at each crop size must be the same images, but the sizes keep "
            "5 and 2 of them") in err and not out.exists()  # fmt: skip
    turned = tmp_path / "turned"  # as many images at each size, but not the same ones
    turned.mkdir()
    for name, shape in (("wide0", (16, 32)), ("wide1", (16, 32)), ("tall0", (32, 16)), ("tall1", (32, 16))):
        Image.fromarray(np.full(shape, 128, np.uint8)).save(turned / f"{name}.png")
    assert main([*BASE, "--data", str(turned), "--crop", "16x32", "32x16", "--iters", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "idm train: error: the training images at each crop size must be the same images, but item 0 is " in err
    assert "wide0.png at one size" in err and "tall0.png at another" in err and not out.exists()


def test_crop_larger_than_every_image(tmp_path, data, capsys):
    out = tmp_path / "run"
    _fails([*BASE, "--data", str(data), "--crop", "64", "--iters", "2", "--out", str(out)], capsys, "larger than every image")
    assert not out.exists()


def test_prior_that_is_not_a_diffusers_model(tmp_path, data, capsys):
    prior = tmp_path / "prior"
    prior.mkdir()
    (prior / "weights.bin").write_bytes(b"0123")
    out = tmp_path / "run"
    args = [a for a in BASE if a not in ("--unet", "tiny")]
    _fails([*args, "--prior", str(prior), "--data", str(data), "--iters", "2", "--out", str(out)], capsys, "not a diffusers U-Net folder")
    assert not out.exists()


def test_a_train_run_or_idm_model_given_as_prior_points_to_init_from(base_run, tmp_path, data, capsys, monkeypatch):
    args = [a for a in BASE if a not in ("--unet", "tiny")]
    models = tmp_path / "models"
    shutil.copytree(base_run / "checkpoints" / "iter_0000002", models / "mine")
    monkeypatch.setenv("IDM_MODELS_DIR", str(models))
    for given in (base_run, base_run / "checkpoints" / "iter_0000002", "mine"):  # "mine": a model's name, not a path
        out = tmp_path / "run"
        _fails([*args, "--prior", str(given), "--data", str(data), "--iters", "2", "--out", str(out)], capsys,
               "is an IDM model or an `idm train` run, not a diffusion prior: --prior takes a diffusers U-Net folder, "
               "an `idm pretrain` run or a shipped prior's name; to start from a trained IDM, use --init-from")  # fmt: skip
        assert not out.exists()


def test_an_image_that_fails_in_a_worker_stops_the_run_with_its_error(tmp_path):
    """A file that passes the start-up check but fails to decode mid-run: a clear error and exit status 2,
    not the worker's traceback and a process waiting for workers that ignore SIGTERM."""
    data = write_images(tmp_path / "d", n=2, size=32)
    whole = (data / "img00.png").read_bytes()
    (data / "zz-cut.png").write_bytes(whole[: len(whole) // 2])
    args = [a if a != "0" or prev != "--num-workers" else "2" for prev, a in zip([""] + BASE, BASE)]
    done = subprocess.run([sys.executable, "-m", "idm", *args, "--data", str(data), "--iters", "4", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "zz-cut.png" in done.stderr and "Original Traceback" not in done.stderr


def test_prior_with_dropout_is_refused_before_anything_is_written(tmp_path, data, capsys):
    """Its masks, drawn anew when the memory-saving backward recomputes, would give wrong gradients."""
    from diffusers import UNet2DModel

    from idm.unets import tiny_unet_config

    prior = tmp_path / "prior"
    UNet2DModel(**{**tiny_unet_config(1), "dropout": 0.1}).save_pretrained(prior)
    out = tmp_path / "run"
    args = [a for a in BASE if a not in ("--unet", "tiny")]
    _fails([*args, "--prior", str(prior), "--data", str(data), "--iters", "2", "--out", str(out)], capsys,
           "needs it deterministic, but it has dropout in training mode")  # fmt: skip
    assert not out.exists()


def test_validation_of_a_prior_with_dropout_scores_the_weights_and_leaves_training_alone(tmp_path, data):
    """With --no-recompute a dropout prior trains; validation runs it in eval mode: the training is the same
    with or without --val-data, and the model is back in training mode after."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from idm.unets import tiny_unet_config

    prior = tmp_path / "prior"
    UNet2DModel(**{**tiny_unet_config(1), "dropout": 0.3}).save_pretrained(prior)
    args = [*(a for a in BASE if a not in ("--unet", "tiny")), "--prior", str(prior), "--no-recompute", "--data", str(data),
            "--iters", "3", "--checkpoint-every", "3"]  # fmt: skip
    logs = {}
    for name, extra in (("plain", []), ("validated", ["--val-data", str(data), "--val-every", "1"])):
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
        logs[name] = read_log(tmp_path / name)
    weights = [load_file(tmp_path / name / "checkpoints" / "iter_0000003" / "model.safetensors") for name in logs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [r["loss"] for r in logs["plain"]] == [r["loss"] for r in logs["validated"]]
    assert len({r["val_psnr"] for r in logs["validated"]}) == 3  # scored at each iteration, of the weights alone


def test_existing_run_without_resume_is_refused(base_run, tmp_path, data, capsys):
    out = copy_run(base_run, tmp_path)
    before = snapshot(out)
    _fails([*BASE, "--data", str(data), "--iters", "2", "--out", str(out)], capsys, "pass --resume")
    assert snapshot(out) == before


def test_an_out_folder_that_is_no_run_folder_keeps_its_files(base_run, tmp_path, data, capsys):
    """--out may hold files of its own (a log of the job that runs idm train), never the names a run writes
    (a log.csv of the user's) unless it is a run folder; it may not be the data folder. A run folder that lost
    its config.json still resumes from its checkpoints."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.csv").write_text("my,important,log\n")
    before = snapshot(mine)
    _fails([*BASE, "--data", str(data), "--iters", "2", "--out", str(mine)], capsys,
           "is not a run folder (no config.json, no checkpoint), but holds log.csv, which the run would overwrite")  # fmt: skip
    assert snapshot(mine) == before
    images = snapshot(data)
    _fails([*BASE, "--data", str(data), "--iters", "2", "--out", str(data)], capsys, "is the data folder")
    assert snapshot(data) == images
    job = tmp_path / "job"
    job.mkdir()
    (job / "train.log").write_text("started\n")  # idm train ... 2> job/train.log
    assert main([*BASE, "--data", str(data), "--iters", "1", "--checkpoint-every", "1", "--out", str(job)]) == 0
    assert (job / "train.log").read_text() == "started\n" and (job / "config.json").is_file()
    lost = copy_run(base_run, tmp_path)
    (lost / "config.json").unlink()
    assert main([*BASE, "--data", str(data), "--iters", "3", "--checkpoint-every", "1", "--out", str(lost), "--resume"]) == 0
    assert (lost / "checkpoints" / "iter_0000003").is_dir()


def test_resume_with_another_config_is_refused(base_run, tmp_path, data, capsys):
    out = copy_run(base_run, tmp_path)
    before = snapshot(out)
    args = [*BASE, "--data", str(data), "--iters", "4", "--out", str(out), "--resume"]  # 4: other default milestones
    args[args.index("--ratio") + 1] = "0.5"
    args[args.index("--batch-size") + 1] = "4"
    err = _fails([*args, "--ssim-weight", "0.5", "--log-loss"], capsys, "different configuration")
    assert "operator.ratio: 0.25 in the run, 0.5 now" in err and "training.batch_size: 2 in the run, 4 now" in err
    assert "training.ssim_weight: null in the run, 0.5 now" in err and "--init-from" in err  # another loss, another run
    assert "training.log_loss: null in the run, true now" in err
    assert "training.lr_milestones: [1, 2] in the run, [1, 2, 3] now" in err and "--lr-milestones" in err
    assert snapshot(out) == before


def test_a_run_recorded_before_the_ssim_weight_joined_its_identity_resumes(tmp_path, data, capsys):
    """Older runs kept --ssim-weight in their settings only: resuming one with its own weight still works."""
    out = tmp_path / "run"
    argv = [*BASE, "--data", str(data), "--ssim-weight", "0.5", "--lr-milestones", "9", "--out", str(out)]
    assert main([*argv, "--iters", "1"]) == 0
    for record in (out / "config.json", *out.glob("checkpoints/*/run.json")):  # as the code before wrote them
        run = json.loads(record.read_text())
        del run["identity"]["training"]["ssim_weight"]
        assert run["settings"]["ssim_weight"] == 0.5
        record.write_text(json.dumps(run))
    assert main([*argv, "--iters", "2", "--resume"]) == 0
    without = [a for a in argv if a not in ("--ssim-weight", "0.5")]
    assert main([*without, "--iters", "3", "--resume"]) == 2
    assert "training.ssim_weight: 0.5 in the run, null now" in capsys.readouterr().err


def test_a_damaged_latest_checkpoint_is_named_as_damaged_where_it_is_loaded(base_run, tmp_path):
    """idm reconstruct / benchmark take a run folder's latest checkpoint: a broken one says what is wrong with it."""
    out = copy_run(base_run, tmp_path)
    latest = out / "checkpoints" / "iter_0000002"
    (latest / "config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match=r"iter_0000002' is not an IDM model folder: .*is not valid JSON.*the checkpoint is damaged"):
        resolve_model_dir(out)
    (latest / "config.json").unlink()
    with pytest.raises(CheckpointError, match="it lacks config.json; the checkpoint is damaged"):
        resolve_model_dir(out)


@pytest.mark.parametrize("damage", ["truncate", "garbage_json", "no_optimizer", "moment_shape", "moment_missing", "rng_short"])
def test_damaged_checkpoint_is_refused(base_run, tmp_path, data, capsys, damage):
    from safetensors.torch import load_file, save_file

    out = copy_run(base_run, tmp_path)
    latest = out / "checkpoints" / "iter_0000002"
    if damage in ("moment_shape", "moment_missing"):  # readable files whose content does not fit the model
        tensors = load_file(latest / "optimizer.safetensors")
        key = next(k for k in tensors if k.endswith(".exp_avg") and tensors[k].dim() == 4)
        if damage == "moment_shape":
            tensors[key] = tensors[key][:1]
        else:
            del tensors[key]
        save_file(tensors, latest / "optimizer.safetensors")
    elif damage == "rng_short":
        tensors = load_file(latest / "rng.safetensors")
        tensors["torch_cpu"] = tensors["torch_cpu"][:100]
        save_file(tensors, latest / "rng.safetensors")
    elif damage == "truncate":
        blob = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage_json":
        (latest / "trainer_state.json").write_text('{"iteration": 2, "optimi')
    else:
        state = json.loads((latest / "trainer_state.json").read_text())
        del state["optimizer"]
        (latest / "trainer_state.json").write_text(json.dumps(state))
    before = snapshot(out)
    err = _fails([*BASE, "--data", str(data), "--iters", "2", "--out", str(out), "--resume"], capsys, "cannot resume from")
    assert "iter_0000002" in err and "damaged" in err
    assert snapshot(out) == before


# ---- building blocks -------------------------------------------------------------------------
def test_shards_of_all_ranks_make_the_global_batch():
    items = [torch.full((1, 4, 4), float(i)) for i in range(5)]
    whole = ShardedBatches(items, 4, seed=3, augment=True)
    halves = [ShardedBatches(items, 4, seed=3, rank=r, world_size=2, augment=True) for r in (0, 1)]
    for it in range(4):  # crosses epochs (5 items, 4 per batch)
        assert torch.equal(torch.cat([h[it] for h in halves]), whole[it])
    seen = [int(x[0, 0, 0]) for it in range(5) for x in whole[it]]
    assert sorted(seen) == sorted(list(range(5)) * 4)  # every item once per epoch
    with pytest.raises(ValueError, match="not a multiple"):
        ShardedBatches(items, 3, seed=0, rank=0, world_size=2)


def test_scalars_get_their_own_learning_rate_and_state_round_trips():
    model = IDM(IDMConfig(unet="tiny", steps=2))
    names = scalar_parameter_names(model)
    assert {"schedule.alpha", "wiring.v", "wiring.in_scale", "wiring.out_scale"} <= names
    assert all(dict(model.named_parameters())[n].numel() < 50 for n in names)
    opt = make_optimizer(model, 1e-4, 10.0)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, pytest.approx(1e-3)]
    assert len(opt.param_groups[1]["params"]) == len(names)
    model(torch.zeros(1, 1, 16, 16), _Identity()).abs().mean().backward()
    opt.step()
    tensors, meta = flatten_optimizer(opt)
    other = make_optimizer(model, 1e-4, 10.0)
    restore_optimizer(other, tensors, meta)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_fused_adam_gives_the_default_kernels_steps_and_a_restore_keeps_the_live_kernel():
    """Fused Adam (the GPU default) on the CPU's fused kernel: the same updates; kernels are the device's choice."""
    torch.manual_seed(0)
    model = IDM(IDMConfig(unet="tiny", steps=2)).double()
    twin = copy.deepcopy(model)
    plain, fused = make_optimizer(model, 1e-3, 10.0), make_optimizer(twin, 1e-3, 10.0, fused=True)
    assert fused_by_default(model.parameters()) is None and all(g["fused"] for g in fused.param_groups)
    y = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    for _ in range(3):
        for net, opt in ((model, plain), (twin, fused)):
            opt.zero_grad()
            net(y, _Identity()).sub(y).abs().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert relative_error(q, p) < 1e-12
    tensors, meta = flatten_optimizer(plain)  # saved by the default kernel ...
    restore_optimizer(fused, tensors, meta)  # ... restored where the fused one runs
    assert all(g["fused"] for g in fused.param_groups)


class _Identity(torch.nn.Module):
    """``A = I`` (a trivial deepinv-style operator)."""

    def A(self, x):
        return x

    def A_adjoint(self, y):
        return y

    def A_dagger(self, y):
        return y


#: BASE for --init-from: the model's architecture comes from the model (no --unet, no --steps)
INIT_FROM_BASE = [a for i, a in enumerate(BASE) if a not in ("--unet", "tiny", "--steps") and BASE[i - 1] != "--steps"]


def test_init_from_a_trained_model_starts_from_its_weights(tmp_path):
    data = write_images(tmp_path / "data")
    first = tmp_path / "first"
    assert main([*BASE, "--data", str(data), "--iters", "2", "--out", str(first)]) == 0
    tuned = tmp_path / "tuned"  # another ratio; the architecture comes from the model, not from BASE's --unet
    flags = INIT_FROM_BASE
    flags = list(flags)
    flags[flags.index("0.25")] = "0.4"
    one_step = ["--data", str(data), "--iters", "1", "--lr", "1e-12"]  # Adam moves each weight by about 1e-12
    assert main([*flags, *one_step, "--init-from", str(first), "--out", str(tuned)]) == 0
    assert main([*flags, *one_step, "--unet", "tiny", "--out", str(tmp_path / "fresh")]) == 0
    before, after = load_trained(first).model.state_dict(), load_trained(tuned).model.state_dict()
    fresh = load_trained(tmp_path / "fresh").model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-8) for k in before)
    assert max(float((before[k] - fresh[k]).abs().max()) for k in before) > 1e-5  # not just the same random init
    run = json.loads((tuned / "config.json").read_text())
    assert run["settings"]["init_from"] == str(first)


def test_init_from_an_export_that_names_its_prior(tmp_path):
    """Shipped models record their prior by name (``--prior-name``), not as a folder here; warm starts still work."""
    data = write_images(tmp_path / "data")
    first = tmp_path / "first"
    assert main([*BASE, "--data", str(data), "--iters", "1", "--out", str(first)]) == 0
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(first), "--fp32", "--prior-name", "prior-not-here", "--out", str(exported)]) == 0
    assert json.loads((exported / "config.json").read_text())["idm"]["unet"] == "prior-not-here"
    flags = INIT_FROM_BASE
    tuned = tmp_path / "tuned"
    assert main([*flags, "--data", str(data), "--iters", "1", "--lr", "1e-12", "--init-from", str(exported), "--out", str(tuned)]) == 0
    before, after = load_trained(exported).model.state_dict(), load_trained(tuned).model.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-8) for k in before)


def test_init_from_refuses_another_task_or_channel_count(tmp_path, capsys):
    data = write_images(tmp_path / "data")
    first = tmp_path / "first"
    assert main([*BASE, "--data", str(data), "--iters", "1", "--out", str(first)]) == 0
    flags = INIT_FROM_BASE
    inpainting = [*flags[:2], "inpainting", *flags[3:]]
    inpainting = [a for a in inpainting if a not in ("--block", "8")]
    assert main([*inpainting, "--color", "y", "--data", str(data), "--init-from", str(first), "--out", str(tmp_path / "a")]) == 2
    assert "task: trained for 'cs', requested 'inpainting'" in capsys.readouterr().err
    assert main([*flags, "--color", "rgb", "--data", str(data), "--init-from", str(first), "--out", str(tmp_path / "b")]) == 2
    assert "1-channel images, task cs (rgb) gives 3" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for architecture in (["--steps", "2"], ["--invertible", "none"], ["--no-injectors"], ["--alpha-init", "0.9"]):
        assert main([*flags, *architecture, "--data", str(data), "--init-from", str(first), "--out", str(tmp_path / "c")]) == 2
        assert f"{architecture[0]} set the architecture of a new model; --init-from" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_out_of_device_memory_is_a_clear_error_naming_what_to_change():
    from idm.training import distributed
    from idm.training.loop import Cadence, OutOfDeviceMemory, run_loop

    saved = []

    def step(i, batch):
        if i == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 484.00 MiB.\nmore detail")
        return torch.tensor(0.5)

    with pytest.raises(OutOfDeviceMemory, match=r"iteration 3 \(this process's batch 4x1x16x16\): lower --batch-size") as caught:
        run_loop(start=0, stop=5, batches=iter([torch.zeros(4, 1, 16, 16)] * 5), step=step, lr_at=lambda i: 1e-4,
                 save=lambda it, sec: saved.append(it), cadence=Cadence(checkpoint_every=2, log_every=1),
                 env=distributed.detect(), device=torch.device("cpu"), progress=False)  # fmt: skip
    assert "Tried to allocate 484.00 MiB." in str(caught.value) and "more detail" not in str(caught.value)
    assert saved == [2]  # the checkpoint before the failure stays; --resume continues from it
    assert isinstance(caught.value, ValueError)  # the CLI prints it as `idm train: error: ...`


def test_a_diverged_loss_stops_the_run_before_it_is_checkpointed():
    from idm.training import distributed
    from idm.training.loop import Cadence, TrainingDiverged, run_loop

    saved = []
    losses = [0.5, 0.4, 0.3, float("nan"), 0.2, 0.1]  # iteration 4 diverges; 5 and 6 would look fine again
    with pytest.raises(TrainingDiverged, match=r"loss is nan over iterations 4\.\.4: .*No checkpoint was written after iteration 2\. .*start a new run \(another --out\) with --init-from runs/x/checkpoints/iter_0000002") as caught:
        run_loop(start=0, stop=6, batches=iter([torch.zeros(1)] * 6), step=lambda i, b: torch.tensor(losses[i]),
                 lr_at=lambda i: 1e-4, save=lambda it, sec: saved.append(it), cadence=Cadence(checkpoint_every=2, log_every=1),
                 env=distributed.detect(), device=torch.device("cpu"), progress=False, checkpoints=Path("runs/x/checkpoints"))  # fmt: skip
    assert saved == [2] and isinstance(caught.value, ValueError)  # iteration 4's checkpoint is never written
    assert "--precision" not in str(caught.value)  # no autocast ran: nothing to switch off
    with pytest.raises(TrainingDiverged, match=r"with a lower --lr \(or in float32, --precision fp32\)"):
        run_loop(start=0, stop=2, batches=iter([torch.zeros(1)] * 2), step=lambda i, b: torch.tensor(float("inf")),
                 lr_at=lambda i: 1e-4, save=lambda it, sec: None, cadence=Cadence(checkpoint_every=2, log_every=1),
                 env=distributed.detect(), device=torch.device("cpu"), progress=False, bf16=True)  # fmt: skip


def test_ct_runs_take_the_task_model_defaults_and_flags_override_them(tmp_path):
    """ct trains with pinv_mapping="images" and alpha_init=0.99 unless told otherwise (tasks/ct.py)."""
    slices = tmp_path / "ct"
    slices.mkdir()
    rng = np.random.default_rng(0)
    np.save(slices / "s.npy", (rng.random((16, 16)) * 1400 - 1000).astype(np.int16))  # HU
    argv = ["train", "--task", "ct", "--views", "6", "--unet", "tiny", "--steps", "1", "--crop", "16",
            "--batch-size", "1", "--iters", "1", "--device", "cpu", "--num-workers", "0", "--no-progress",
            "--data", str(slices)]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "default")]) == 0
    model = load_trained(tmp_path / "default").model.config
    assert (model.pinv_mapping, model.alpha_init) == ("images", 0.99)
    assert main([*argv, "--pinv-mapping", "measurements", "--alpha-init", "0.5", "--out", str(tmp_path / "set")]) == 0
    model = load_trained(tmp_path / "set").model.config
    assert (model.pinv_mapping, model.alpha_init) == ("measurements", 0.5)
    assert model.final_projection is True  # by least squares: FBP is no projection (IDMConfig.projection_cg_iters)
    assert main([*argv, "--no-final-projection", "--out", str(tmp_path / "plain")]) == 0
    assert load_trained(tmp_path / "plain").model.config.final_projection is False


def test_final_projection_defaults_to_the_task_and_to_the_init_from_model(tmp_path):
    data = write_images(tmp_path / "data")
    one_step = ["--data", str(data), "--iters", "1", "--lr", "1e-12"]
    assert main([*BASE, *one_step, "--out", str(tmp_path / "default")]) == 0
    assert load_trained(tmp_path / "default").model.config.final_projection is True  # cs: A^+ is exact
    assert main([*BASE, *one_step, "--no-final-projection", "--out", str(tmp_path / "off")]) == 0
    assert load_trained(tmp_path / "off").model.config.final_projection is False
    flags = INIT_FROM_BASE
    assert main([*flags, *one_step, "--init-from", str(tmp_path / "off"), "--out", str(tmp_path / "kept")]) == 0
    assert load_trained(tmp_path / "kept").model.config.final_projection is False  # the model's, not the task's
    assert main([*flags, *one_step, "--init-from", str(tmp_path / "off"), "--final-projection", "--out", str(tmp_path / "on")]) == 0
    assert load_trained(tmp_path / "on").model.config.final_projection is True


def test_runs_recorded_before_final_projection_existed_still_resume(tmp_path, capsys):
    """A run folder whose recorded model identity has no final_projection field (older runs, in which it was off,
    and the runs that left it out at its default) resumes; a differing setting is named with both values."""
    data = write_images(tmp_path / "data")
    out = tmp_path / "run"
    argv = [*BASE, "--no-final-projection", "--lr-milestones", "5", "--data", str(data), "--checkpoint-every", "1", "--out", str(out)]
    assert main([*argv, "--iters", "1"]) == 0
    for record in (out / "config.json", *out.glob("checkpoints/*/run.json")):
        run = json.loads(record.read_text())
        assert run["identity"]["model"].pop("final_projection") is False  # recorded, and removed here: as an older run
        record.write_text(json.dumps(run))
    assert main([*argv, "--iters", "2", "--resume"]) == 0
    assert main([*BASE, "--lr-milestones", "5", "--data", str(data), "--iters", "3", "--resume", "--out", str(out)]) == 2
    assert "model.final_projection: false in the run, true now" in capsys.readouterr().err


def test_log_rows_cut_short_by_a_crash_are_dropped_on_resume(tmp_path):
    from idm.training.csv_log import CsvLog

    log = CsvLog(tmp_path / "log.csv")
    log.start(None)
    for i in (1, 2):
        log.append(iteration=i, loss=0.5, lr=1e-4, seconds=float(i))
    with open(tmp_path / "log.csv", "a") as handle:
        handle.write("3,0.4")  # the process died while writing iteration 3's row
    log.start(resume_iteration=3)
    assert [r["iteration"] for r in read_log(tmp_path)] == ["1", "2"]
    log.append(iteration=3, loss=0.4, lr=1e-4, seconds=3.0)
    assert [r["loss"] for r in read_log(tmp_path)] == ["0.5", "0.5", "0.4"]


def test_kept_attention_trains_the_same_weights_and_may_change_on_resume(base_run, tmp_path, data, capsys):
    """--keep-attention changes how the backward runs, not what it computes: a chunk may switch it on."""
    runs = {}
    for keep in (False, True):
        out = copy_run(base_run, tmp_path / str(keep))
        assert main([*BASE, "--data", str(data), "--iters", "3", "--out", str(out), "--resume",
                     *(["--keep-attention"] if keep else [])]) == 0  # fmt: skip
        runs[keep] = weights(out, 3)
        assert load_trained(out).model.config.keep_attention == keep  # this chunk's choice is what it ran
    assert runs[True].keys() == runs[False].keys()
    assert all(torch.allclose(runs[True][k], runs[False][k], rtol=1e-5, atol=1e-7) for k in runs[True])
    _fails([*BASE, "--data", str(data), "--iters", "1", "--invertible", "steps", "--keep-attention",
            "--out", str(tmp_path / "refused")], capsys, "--keep-attention applies to the wired U-Net blocks")  # fmt: skip
    assert not (tmp_path / "refused").exists()


def test_a_model_trained_on_rgb_images_reads_rgb_images_without_the_flag_again(tmp_path):
    data = tmp_path / "rgb"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(data / f"c{i}.png")
    run = tmp_path / "run"
    assert main([*BASE, "--color", "rgb", "--data", str(data), "--iters", "1", "--out", str(run)]) == 0
    for command in (["reconstruct", "--input"], ["benchmark", "--methods", "idm", "--data"]):
        out = tmp_path / command[0]
        assert main([*command, str(data), "--checkpoint", str(run), "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    assert np.load(tmp_path / "reconstruct" / "c0.npy").shape == (3, 24, 24)
    assert main(["simulate", "--input", str(data), "--checkpoint", str(run), "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "m.npz")]) == 0  # fmt: skip


def test_a_model_trained_on_a_deepinv_physics_loads_and_says_what_it_cannot_check(tmp_path, capsys):
    """train() takes any deepinv physics; only its class is recorded, so load_trained serves it to Python
    callers and refuses, by name, a request it cannot check (the command line's operator settings)."""
    from deepinv.physics import Inpainting

    from idm.train import TrainConfig, train

    torch.manual_seed(0)
    images = [torch.rand(1, 16, 16) for _ in range(4)]
    physics = Inpainting(img_size=(1, 16, 16), mask=0.5)
    config = TrainConfig(iters=2, batch_size=2, checkpoint_every=2, log_every=1, num_workers=0, progress=False)
    train(IDMConfig(unet="tiny", steps=1), images, physics, tmp_path / "run", config, say=lambda _: None)
    trained = load_trained(tmp_path / "run")
    assert trained.foreign_operator == "Inpainting" and trained.operator is None and trained.image_size is None
    assert trained.run["settings"]["hardware"].startswith("CPU, ")  # recorded without the command line too
    y = physics.A(images[0][None])
    assert trained.model(y, physics).shape == (1, 1, 16, 16)
    with pytest.raises(CheckpointError, match="trained with a physics of class Inpainting, which is not a registered toolkit operator"):
        load_trained(tmp_path / "run", expect_operator={"name": "inpainting", "ratio": 0.5})
    write_images(tmp_path / "images", n=1, size=16)
    for command in (["reconstruct", "--input", str(tmp_path / "images")], ["benchmark", "--data", str(tmp_path / "images")]):
        assert main([*command, "--checkpoint", str(tmp_path / "run"), "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert "was trained from Python (idm.train.train, task 'custom')" in capsys.readouterr().err
    record = next((tmp_path / "run" / "checkpoints").iterdir()) / "run.json"
    run = json.loads(record.read_text())
    run["identity"]["task"] = "gone"  # a plug-in task whose package is not installed here
    record.write_text(json.dumps(run))
    assert main(["reconstruct", "--input", str(tmp_path / "images"), "--checkpoint", str(tmp_path / "run"), "--device",
                 "cpu", "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "trained for task 'gone', which this installation does not have" in capsys.readouterr().err


PLUGIN_MODULE = '''
import operators
from tasks import Schedule, Task


@operators.register("decimate_plugin")
class Decimate(operators.Operator):
    def __init__(self, img_size, channels=1, factor=2):
        super().__init__(img_size, channels)
        self.factor = factor

    def measurement_shape(self):
        c, h, w = self.image_shape
        return (c, h // self.factor, w // self.factor)

    def A(self, x, **kwargs):
        self.check_image(x)
        return x[..., :: self.factor, :: self.factor]

    def A_adjoint(self, y, **kwargs):
        self.check_measurement(y)
        x = y.new_zeros(y.shape[0], *self.image_shape)
        x[..., :: self.factor, :: self.factor] = y
        return x

    def A_dagger(self, y, **kwargs):
        return self.A_adjoint(y)

    def config(self):
        return {"name": self.name, "img_size": list(self.img_hw), "channels": self.channels, "factor": self.factor}


TASK = Task(name="decimate", operator="decimate_plugin", operator_defaults={"factor": 2}, channels=1, color="gray",
            crop=16, schedule=Schedule(iters=10, batch_size=2))
WRONG_NAME = Task(name="other", operator="decimate_plugin", channels=1, color="gray")
LIKE_A_MODULE = Task(name="measurements", operator="decimate_plugin", channels=1, color="gray")  # a module of tasks/, not a task
CUSTOM = Task(name="custom", operator="decimate_plugin", operator_defaults={"factor": 2}, channels=1, color="gray",
              crop=16)  # the name idm.train.train records for runs started from Python: a plug-in may take it
'''


def test_a_task_from_another_installed_package_trains_through_its_entry_point(tmp_path, data, monkeypatch, capsys):
    """An installed package names its task in the idm.tasks entry-point group; idm train finds it there (and
    its module registers the task's operator), idm info lists both. Broken or misnamed entry points are clear
    errors."""
    import tasks

    site = tmp_path / "site"
    (site / "idm_plugin_tasks_test.py").parent.mkdir()
    (site / "idm_plugin_tasks_test.py").write_text(PLUGIN_MODULE)
    meta = site / "idm_plugin_tasks_test-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: idm-plugin-tasks-test\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text(
        "[idm.tasks]\ndecimate = idm_plugin_tasks_test:TASK\nmisnamed = idm_plugin_tasks_test:WRONG_NAME\n"
        "broken = idm_plugin_tasks_test_missing:TASK\ncs = idm_plugin_tasks_test:TASK\n"
        "measurements = idm_plugin_tasks_test:LIKE_A_MODULE\ncustom = idm_plugin_tasks_test:CUSTOM\n"
    )
    monkeypatch.syspath_prepend(str(site))
    assert {"decimate", "misnamed", "broken", "cs"} <= set(tasks.available())
    assert tasks.get("cs").operator == "cs"  # a plug-in cannot replace a built-in task
    assert tasks.get("measurements").operator == "decimate_plugin"  # tasks/measurements.py is no task
    try:
        out = tmp_path / "run"
        args = ["train", "--task", "decimate", "--unet", "tiny", "--steps", "1", "--crop", "16", "--batch-size", "2",
                "--device", "cpu", "--num-workers", "0", "--no-progress", "--iters", "2", "--data", str(data), "--out", str(out)]
        assert main(args) == 0
        trained = load_trained(out, expect_task="decimate", expect_operator={"name": "decimate_plugin", "factor": 2})
        assert trained.operator["factor"] == 2
        measured = tmp_path / "m.npz"
        assert main(["simulate", "--task", "decimate", "--input", str(data), "--device", "cpu", "--out", str(measured)]) == 0
        import operators

        operators.REGISTRY._classes.pop("decimate_plugin")  # as in a fresh process: the file names the task,
        sys.modules.pop("idm_plugin_tasks_test")  # whose module registers the operator when it is loaded
        args = ["reconstruct", "--input", str(measured), "--checkpoint", str(out), "--device", "cpu", "--no-progress"]
        assert main([*args, "--out", str(tmp_path / "rec")]) == 0 and "decimate_plugin" in operators.available()
        capsys.readouterr()
        assert main(["info", "--device", "cpu", "--out", str(tmp_path / "info.json")]) == 0
        info = json.loads((tmp_path / "info.json").read_text())
        assert "decimate" in info["tasks"] and "decimate_plugin" in info["operators"]
        assert "idm info: warning: task 'broken'" in capsys.readouterr().err
        with pytest.raises(ValueError, match="must name a tasks.Task called 'misnamed'"):
            tasks.get("misnamed")
        with pytest.raises(ValueError, match="'broken' .*failed to load: No module named 'idm_plugin_tasks_test_missing'"):
            tasks.get("broken")
        assert json.loads((out / "config.json").read_text())["settings"]["task_package"] == "idm-plugin-tasks-test 0.1"
        assert tasks.provider("decimate") == "idm-plugin-tasks-test 0.1" and tasks.provider("cs") is None
        custom = shutil.copytree(out, tmp_path / "custom")  # a plug-in task named "custom": not a run from Python
        for record in custom.rglob("run.json"):
            run = json.loads(record.read_text())
            run["identity"]["task"] = "custom"
            record.write_text(json.dumps(run))
        from idm.cli.common import task_name

        assert task_name(argparse.Namespace(task=None, checkpoint=str(custom))) == "custom"
        assert json.loads(np.load(measured)["meta"][()])["task_package"] == "idm-plugin-tasks-test 0.1"
        sys.path.remove(str(site))  # the plug-in uninstalled: its files name the package to install
        decimate_class = operators.REGISTRY._classes.pop("decimate_plugin")  # as in a fresh process
        sys.modules.pop("idm_plugin_tasks_test")
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / "rec2")]) == 2
        assert (f"{measured}: measured with the operator decimate_plugin of task 'decimate', which this installation "
                "does not have: unknown task 'decimate'; available: cs, ct, inpainting, mri; install "
                "idm-plugin-tasks-test 0.1, which provided it") in capsys.readouterr().err
        operators.REGISTRY._classes["decimate_plugin"] = decimate_class  # the operator registered by other code, not the task
        assert main(["reconstruct", "--input", str(measured), "--device", "cpu", "--out", str(tmp_path / "rec3")]) == 2
        assert ("holds measurements of task 'decimate', which this installation does not have (available: cs, ct, "
                "inpainting, mri); install idm-plugin-tasks-test 0.1, which provided it") in capsys.readouterr().err
        operators.REGISTRY._classes.pop("decimate_plugin")
        assert main(["info", "--checkpoint", str(out), "--device", "cpu"]) == 0  # info reads the record without the task
        assert main(["benchmark", "--checkpoint", str(out), "--data", str(data), "--methods", "idm", "--device", "cpu",
                     "--out", str(tmp_path / "bench")]) == 2
        assert ("was trained for task 'decimate', which this installation does not have (available: cs, ct, inpainting, "
                "mri); install idm-plugin-tasks-test 0.1, which provided it") in capsys.readouterr().err
    finally:
        import operators

        operators.REGISTRY._classes.pop("decimate_plugin", None)
        sys.modules.pop("idm_plugin_tasks_test", None)


def test_bf16_training_on_the_cpu_is_asked_for_recorded_and_part_of_the_identity(tmp_path, data, capsys, monkeypatch):
    """--precision bf16 trains under bfloat16 autocast on the CPU too (auto keeps float32 there); the run records
    what it asked for (identity) and what that meant (settings), and a resume in other arithmetic is refused."""
    from idm import hardware

    monkeypatch.setattr(hardware, "has_native_bf16", lambda device: True)  # no emulation warning on any CPU
    out = tmp_path / "run"
    argv = [*BASE, "--data", str(data), "--lr-milestones", "9", "--out", str(out)]
    assert main([*argv, "--iters", "1", "--precision", "bf16"]) == 0
    run = json.loads((out / "config.json").read_text())
    assert run["identity"]["training"]["precision"] == "bf16" and run["settings"]["arithmetic"] == "bf16"
    assert "amp" not in run["identity"]["training"]
    assert main([*argv, "--iters", "2", "--resume"]) == 2  # auto, float32 on the CPU: another run
    err = capsys.readouterr().err
    assert "training.precision: \"bf16\" in the run, \"auto\" now" in err and "resume with the run's --precision" in err

    fp32 = tmp_path / "fp32"
    assert main([*BASE, "--data", str(data), "--lr-milestones", "9", "--iters", "1", "--out", str(fp32)]) == 0
    assert json.loads((fp32 / "config.json").read_text())["settings"]["arithmetic"] == "fp32"
    copy = shutil.copytree(fp32, tmp_path / "moved")  # as if its first chunk had run on CUDA (auto: bf16)
    for record in (copy / "config.json", *copy.glob("checkpoints/*/run.json")):
        run = json.loads(record.read_text())
        run["settings"]["arithmetic"] = "bf16"
        record.write_text(json.dumps(run))
    capsys.readouterr()
    assert main([*BASE, "--data", str(data), "--lr-milestones", "9", "--iters", "2", "--resume", "--out", str(copy)]) == 0
    assert ("idm train: warning: this chunk trains in fp32, the chunk before it in bf16: with --precision auto the "
            "arithmetic follows the device (bf16 on CUDA, fp32 on the CPU); resume on the chunk before's device to keep "
            "it") in capsys.readouterr().err  # fmt: skip
    with pytest.raises(SystemExit):  # a usage error, as argparse's own
        main([*BASE, "--data", str(data), "--iters", "1", "--no-amp", "--out", str(tmp_path / "x")])
    assert "idm train: error: --no-amp was replaced by --precision fp32" in capsys.readouterr().err
    # the two runs computed in different arithmetic: the same seed, data and start, not the same weights
    a, b = weights(out, 1), weights(fp32, 1)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_training_precision_auto_is_bf16_on_cuda_only_and_emulated_bf16_is_warned_about(monkeypatch):
    from idm import hardware
    from idm.precision import training_precision
    from idm.training.options import LoopOptions

    monkeypatch.setattr(hardware, "hardware_name", lambda device: f"the {device.type} device")  # no GPU to name here
    monkeypatch.setattr(hardware, "has_native_bf16", lambda device: True)
    assert training_precision("auto", "cuda") == "bf16" and training_precision("auto", "cpu") == "fp32"
    assert training_precision("fp32", "cuda") == "fp32"
    monkeypatch.setattr(hardware, "has_native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="no native bfloat16: float32 \\(--precision fp32\\) may train faster"):
        assert training_precision("bf16", "cpu") == "bf16"
    with pytest.warns(UserWarning, match="no native bfloat16"):  # auto on a GPU before Ampere: bf16, said
        assert training_precision("auto", "cuda") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        LoopOptions(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16; got 'fp16'"):
        training_precision("fp16", "cpu")


def test_runs_recorded_with_amp_resume_as_their_precision(tmp_path, data, capsys):
    """Runs from before --precision recorded "amp": true (bf16 on CUDA, float32 on the CPU: auto) or false (fp32)."""
    out = tmp_path / "run"
    argv = [*BASE, "--data", str(data), "--lr-milestones", "9", "--out", str(out)]
    assert main([*argv, "--iters", "1"]) == 0
    for record in (out / "config.json", *out.glob("checkpoints/*/run.json")):  # as the code before wrote them
        run = json.loads(record.read_text())
        assert run["identity"]["training"].pop("precision") == "auto"
        run["identity"]["training"]["amp"] = True
        record.write_text(json.dumps(run))
    assert main([*argv, "--iters", "2", "--resume"]) == 0
    assert main([*argv, "--iters", "3", "--resume", "--precision", "fp32"]) == 2
    assert "training.precision: \"auto\" in the run, \"fp32\" now" in capsys.readouterr().err


# ---- --ema-decay -------------------------------------------------------------------------------
def _ema_run_args(base_run: Path, data: Path, iters: int) -> list[str]:
    """A short run from ``base_run``'s last checkpoint (known starting weights), a checkpoint every iteration."""
    start = base_run / "checkpoints" / "iter_0000002"
    return [*INIT_FROM_BASE, "--data", str(data), "--init-from", str(start), "--iters", str(iters),
            "--checkpoint-every", "1", "--keep", "10", "--lr-milestones", "100"]  # fmt: skip


def test_an_ema_run_trains_the_same_weights_and_checkpoints_their_average(base_run, tmp_path, data, capsys):
    """--ema-decay changes what a checkpoint offers as the model, not the training: its training weights equal
    those of the same run without it, bit for bit, and its model is their warm-up average (float64 reference)."""
    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    assert main([*_ema_run_args(base_run, data, 3), "--out", str(plain)]) == 0
    assert main([*_ema_run_args(base_run, data, 3), "--ema-decay", "0.5", "--out", str(averaged)]) == 0
    start = load_file(str(base_run / "checkpoints" / "iter_0000002" / "model.safetensors"))
    reference = {k: v.double() for k, v in start.items() if v.is_floating_point()}
    for n in range(3):
        own = weights(averaged, n + 1, "training_weights.safetensors")
        assert own.keys() == start.keys() and all(torch.equal(own[k], v) for k, v in weights(plain, n + 1).items())
        d = min(0.5, (1 + n) / (10 + n))  # the warm-up: 0.1, 2/11, 0.25
        reference = {k: d * v + (1 - d) * own[k].double() for k, v in reference.items()}
        model = weights(averaged, n + 1)
        assert max(relative_error(model[k].double(), reference[k], floor=1e-6) for k in reference) < 1e-6
    assert max(relative_error(model[k].double(), own[k].double(), floor=1e-6) for k in reference) > 1e-4  # not the last weights
    loaded = load_trained(averaged).model.state_dict()  # what idm reconstruct / benchmark / export read
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    state = json.loads((averaged / "checkpoints" / "iter_0000003" / "trainer_state.json").read_text())
    assert state["ema_updates"] == 3
    assert json.loads((averaged / "config.json").read_text())["identity"]["training"]["ema_decay"] == 0.5
    assert "ema_decay" not in json.loads((plain / "config.json").read_text())["identity"]["training"]
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(averaged)]) == 0 and main(["info", "--checkpoint", str(plain)]) == 0
    described = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trained: ")]
    assert described[0].endswith("their moving average (EMA decay 0.5)") and "average" not in described[1]


def test_an_ema_run_resumes_exactly_and_its_setting_cannot_change(base_run, tmp_path, data, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*_ema_run_args(base_run, data, 4), "--ema-decay", "0.9", "--out", str(straight)]) == 0
    assert main([*_ema_run_args(base_run, data, 2), "--ema-decay", "0.9", "--out", str(split)]) == 0
    assert main([*_ema_run_args(base_run, data, 4), "--ema-decay", "0.9", "--out", str(split), "--resume"]) == 0
    for name in ("model.safetensors", "training_weights.safetensors", "optimizer.safetensors"):
        a, b = weights(straight, 4, name), weights(split, 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    before = snapshot(split)
    err = _fails([*_ema_run_args(base_run, data, 6), "--ema-decay", "0.99", "--out", str(split), "--resume"], capsys,
                 "different configuration")  # fmt: skip
    assert "training.ema_decay: 0.9 in the run, 0.99 now" in err and "--init-from" in err
    err = _fails([*_ema_run_args(base_run, data, 6), "--out", str(split), "--resume"], capsys, "different configuration")
    assert "training.ema_decay: 0.9 in the run, null now" in err
    (split / "checkpoints" / "iter_0000004" / "training_weights.safetensors").unlink()
    err = _fails([*_ema_run_args(base_run, data, 6), "--ema-decay", "0.9", "--out", str(split), "--resume"], capsys,
                 "cannot resume from")  # fmt: skip
    assert "iter_0000004" in err and "training_weights.safetensors" in err and "damaged" in err
    del before["checkpoints/iter_0000004/training_weights.safetensors"]
    assert snapshot(split) == before  # nothing written by the refused runs


def test_ema_decay_out_of_range_is_a_usage_error(tmp_path, data, capsys):
    _fails([*BASE, "--data", str(data), "--iters", "1", "--ema-decay", "1", "--out", str(tmp_path / "run")], capsys,
           "ema_decay must be in")  # fmt: skip
    assert not (tmp_path / "run").exists()
