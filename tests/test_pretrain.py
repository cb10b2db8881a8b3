"""``idm pretrain``: the exported prior loads in IDM and diffusers; exact resume; EMA; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

import operators
from idm import IDM, IDMConfig
from idm.cli import main
from idm.pretrain import PriorArchitecture
from idm.training.ema import EMA
from tests.test_train import read_log, snapshot, write_images

BASE = [
    "pretrain", "--channels", "1", "--crop", "16", "--batch-size", "2", "--width", "16", "--levels", "2",
    "--layers-per-block", "1", "--device", "cpu", "--num-workers", "0", "--no-progress", "--log-every", "1",
]  # fmt: skip




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "train", n=4, size=20)


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert main([*BASE, "--data", str(data), "--iters", "3", "--checkpoint-every", "2", "--out", str(out)]) == 0
    return out


def test_prior_loads_in_diffusers_and_idm(prior_run):
    prior = prior_run / "prior"
    unet = UNet2DModel.from_pretrained(prior)
    scheduler = DDPMScheduler.from_pretrained(prior)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"
    assert scheduler.config.prediction_type == "epsilon"
    images = DDPMPipeline(unet=unet, scheduler=scheduler)(
        batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (1, 16, 16, 1) and 0.0 <= images.min() <= images.max() <= 1.0
    info = json.loads((prior / "idm_prior.json").read_text())
    assert info["data_range"] == [-1.0, 1.0] and info["iteration"] == 3 and info["channels"] == 1

    model = IDM(IDMConfig(unet=str(prior), steps=1))
    op = operators.make("cs", img_size=(16, 16), channels=1, ratio=0.25, block=8)
    x = torch.rand(1, 1, 16, 16)
    assert model(op.A(x), op).shape == (1, 1, 16, 16)

    # the exported prior holds the EMA weights, not the raw ones
    ckpt = prior_run / "checkpoints" / "iter_0000003"
    raw, ema = load_file(str(ckpt / "unet.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    exported = unet.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)
    assert [r["iteration"] for r in read_log(prior_run)] == ["1", "2", "3"]


def test_idm_train_accepts_a_pretrain_folder_as_prior(prior_run, data, tmp_path, monkeypatch):
    out = tmp_path / "idm"
    monkeypatch.chdir(prior_run.parent)  # given relative, recorded absolute: the benchmarks find it from anywhere
    args = ["train", "--task", "cs", "--ratio", "0.25", "--block", "8", "--prior", prior_run.name, "--steps", "1",
            "--crop", "16", "--batch-size", "2", "--iters", "1", "--device", "cpu", "--num-workers", "0",
            "--no-progress", "--data", str(data), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    config = json.loads((out / "checkpoints" / "iter_0000001" / "config.json").read_text())
    assert config["unet_class"] == "UNet2DModel" and config["idm"]["prior_range"] == "symmetric"
    assert config["idm"]["unet"] == str(prior_run / "prior")


def test_a_pretrain_run_stands_for_its_prior_everywhere(prior_run, tmp_path, capsys):
    from benchmarks.prior import PriorError, load_prior

    assert load_prior(prior_run).unet.config.in_channels == 1  # e.g. idm benchmark --prior RUN
    early = tmp_path / "early"  # a run stopped before its first checkpoint: config.json, no prior/ yet
    early.mkdir()
    (early / "config.json").write_text((prior_run / "config.json").read_text())
    with pytest.raises(PriorError, match="has not exported its prior/ yet"):
        load_prior(early)
    assert main([*_train_args(early), "--out", str(tmp_path / "idm")]) == 2
    assert "has not exported its prior/ yet" in capsys.readouterr().err


def _train_args(prior: Path) -> list[str]:
    return ["train", "--task", "cs", "--ratio", "0.25", "--block", "8", "--prior", str(prior), "--steps", "1", "--crop", "16",
            "--batch-size", "2", "--iters", "1", "--device", "cpu", "--num-workers", "0", "--no-progress", "--data", "."]  # fmt: skip


def test_a_prior_named_like_a_shipped_one_keeps_its_recorded_range(prior_run, tmp_path, monkeypatch):
    from idm.shipped import MODELS_ENV

    shutil.copytree(prior_run / "prior", tmp_path / "models" / "my-prior")
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    by_name = IDM(IDMConfig(unet="my-prior", steps=1))  # as from Python, without the CLI's --prior resolution
    assert by_name.config.prior_range == "symmetric" == IDM(IDMConfig(unet=str(tmp_path / "models" / "my-prior"), steps=1)).config.prior_range


def test_pretrain_resume_is_exact(tmp_path, data, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*BASE, "--data", str(data), "--checkpoint-every", "2"]
    assert main([*common, "--iters", "4", "--out", str(straight)]) == 0
    assert main([*common, "--iters", "2", "--out", str(split)]) == 0
    assert main([*common, "--iters", "4", "--out", str(split), "--resume"]) == 0
    for name in ("unet.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(straight / "checkpoints" / "iter_0000004" / name))
        b = load_file(str(split / "checkpoints" / "iter_0000004" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert snapshot(straight / "prior") == snapshot(split / "prior")

    shutil.rmtree(split / "prior")  # as if stopped between writing the checkpoint and exporting the prior
    assert main(["export", "--checkpoint", str(split), "--out", str(tmp_path / "exported")]) == 2
    assert "writes it when resumed" in capsys.readouterr().err
    assert main([*common, "--iters", "4", "--out", str(split), "--resume"]) == 0  # nothing to train: it catches up
    assert snapshot(straight / "prior") == snapshot(split / "prior")


@pytest.mark.parametrize("damage", ["nan-weights", "nan-ema", "ema-key-missing", "ema-of-another-shape"])
def test_a_damaged_pretrain_checkpoint_is_refused_before_training(tmp_path, data, capsys, damage):
    argv = [*BASE, "--data", str(data), "--checkpoint-every", "2", "--out", str(tmp_path / "run")]
    assert main([*argv, "--iters", "2"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000002"
    path = ckpt / ("unet.safetensors" if damage == "nan-weights" else "ema.safetensors")
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    if damage == "ema-key-missing":
        del tensors[name]
    elif damage == "ema-of-another-shape":
        tensors[name] = tensors[name].flatten()[:1]
    else:
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path))
    before = snapshot(tmp_path / "run" / "prior")
    assert main([*argv, "--iters", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    problem = {"ema-key-missing": "1 missing", "ema-of-another-shape": "1 of another shape"}.get(damage, "hold NaN or inf")
    assert f"{path.name}" in err and problem in err and name in err and "the checkpoint is damaged" in err
    assert snapshot(tmp_path / "run" / "prior") == before  # no prior exported from damaged weights


def test_max_minutes_and_bad_input(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--data", str(data), "--iters", "20", "--max-minutes", "0.001", "--out", str(out)]) == 0
    assert "stopped by the time budget (--max-minutes) after iteration 1 of 20" in capsys.readouterr().out
    assert (out / "prior" / "config.json").is_file()
    before = snapshot(out)

    def fails(args: list[str], match: str) -> None:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("idm pretrain: error:") and match in err, err

    fails([*BASE, "--data", str(data), "--iters", "20", "--out", str(out)], "pass --resume")
    fails([*BASE, "--data", str(data), "--iters", "20", "--lr", "1e-3", "--out", str(out), "--resume"], "training.lr: 0.0002 in the run, 0.001 now")
    fails([*BASE, "--data", str(data), "--iters", "20", "--crop", "17", "--out", str(tmp_path / "x")], "multiple of 2")
    fails([*BASE, "--data", str(data), "--iters", "20", "--crop", "64", "--out", str(tmp_path / "x")], "larger than every image")
    (tmp_path / "empty").mkdir()
    fails([*BASE, "--data", str(tmp_path / "empty"), "--iters", "2", "--out", str(tmp_path / "x")], "no image files")
    fails([*BASE, "--data", str(data), "--data-kind", "ct", "--color", "y", "--iters", "2", "--out", str(tmp_path / "x")],
          "--data-kind ct reads no image files")  # fmt: skip
    assert snapshot(out) == before and not (tmp_path / "x").exists()


def test_ema_warm_up_and_architecture():
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, 0.999)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # first update: decay min(0.999, 1/10) = 0.1
    assert torch.allclose(ema.shadow["weight"], 0.1 * (net.weight - 1) + 0.9 * net.weight)
    cfg = PriorArchitecture().unet_config()
    assert cfg["block_out_channels"] == [64, 128, 256] and cfg["down_block_types"][-1] == "AttnDownBlock2D"
    with pytest.raises(ValueError, match="multiple of 8"):
        PriorArchitecture(width=12)


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5, 6])
def test_every_architecture_pretrain_accepts_carries_the_injectors(levels):
    """A prior idm pretrain makes must take IDM's measurement injectors at every scale: the smallest width
    it accepts builds an IDM, and the multiple of 8 below it (where there is one) is refused with the reason."""
    from diffusers import UNet2DModel

    width = next(w for w in range(8, 2049, 8) if _accepts(w, levels))
    arch = PriorArchitecture(width=width, levels=levels, layers_per_block=1, attention=False)
    with torch.device("meta"):
        unet = UNet2DModel(**arch.unet_config())
    IDM(IDMConfig(steps=1), unet=unet, init_weights=False)
    if width > 8:
        with pytest.raises(ValueError, match=f"with {levels} levels the width must be a multiple of {width}"):
            PriorArchitecture(width=width - 8, levels=levels)


def _accepts(width: int, levels: int) -> bool:
    try:
        PriorArchitecture(width=width, levels=levels)
        return True
    except ValueError:
        return False


def test_a_run_whose_checkpoints_were_deleted_keeps_its_prior(prior_run, data, tmp_path, capsys):
    """Without checkpoints a rerun would start from iteration 0 and overwrite the exported prior: refused."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(prior_run, run)
    shutil.rmtree(run / "checkpoints")
    weights = (run / "prior" / "diffusion_pytorch_model.safetensors").read_bytes()
    for resume in (["--resume"], []):
        assert main([*BASE, "--data", str(data), "--iters", "3", "--checkpoint-every", "2", "--out", str(run), *resume]) == 2
        assert "holds prior from an earlier run, but no checkpoint to resume it from" in capsys.readouterr().err
    assert (run / "prior" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_the_exported_prior_is_readable_by_others_and_named_by_its_iteration(data, tmp_path):
    """safetensors (through diffusers) writes 0600 files: the export gives them the usual mode (0644 under the
    usual umask 022); and a run killed between a checkpoint and its export still names the iteration its
    prior's weights are from."""
    import json
    import os

    from idm.export import export_prior
    from idm.training.run_folder import checkpoint_name

    run = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        assert main([*BASE, "--data", str(data), "--iters", "3", "--checkpoint-every", "2", "--out", str(run)]) == 0
        assert {oct(p.stat().st_mode & 0o777) for p in (run / "prior").iterdir()} == {"0o644"}
    finally:
        os.umask(previous)
    mode = 0o666 & ~previous
    exported = json.loads((run / "prior" / "idm_prior.json").read_text())["iteration"]
    newer = run / "checkpoints" / checkpoint_name(exported + 1)  # written, then killed before the export
    shutil.copytree(run / "checkpoints" / checkpoint_name(exported), newer)
    state = json.loads((newer / "trainer_state.json").read_text())
    (newer / "trainer_state.json").write_text(json.dumps({**state, "iteration": exported + 1}))
    out = export_prior(run, tmp_path / "exported")
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["iteration"] == exported and provenance["source"].endswith(checkpoint_name(exported))
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(mode)}


def test_a_prior_given_as_a_model_is_named(prior_run, tmp_path):
    from idm.checkpoint import CheckpointError
    from idm.training.trained import resolve_model_dir

    with pytest.raises(CheckpointError, match="is a diffusion prior, not an IDM model: pass it as --prior"):
        resolve_model_dir(prior_run / "prior")
    checkpoint = sorted((prior_run / "checkpoints").iterdir())[-1]
    with pytest.raises(CheckpointError, match="is a checkpoint of an `idm pretrain` run, not an IDM model: pass the run"):
        resolve_model_dir(checkpoint)


def test_files_of_another_kind_in_an_image_folder_are_named(tmp_path):
    """A CT folder read as images: its .npy slices are skipped and a multi-page TIFF gives its first page: said."""
    import numpy as np
    from PIL import Image

    from tasks.data import ImageFolderDataset

    np.save(tmp_path / "slice.npy", np.zeros((16, 16), np.float32))
    pages = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "volume.tif", save_all=True, append_images=pages[1:])
    with pytest.warns(UserWarning) as said:
        ImageFolderDataset(tmp_path, color="gray")
    messages = [str(w.message) for w in said]
    assert any("1 file(s) of another kind than image files are not read (slice.npy): CT slices (.npy)" in m for m in messages)
    assert any("1 TIFF file(s) hold several pages, of which only the first is read as an image (volume.tif)" in m
               for m in messages)  # fmt: skip
    (tmp_path / "volume.tif").unlink()
    with pytest.raises(ValueError, match="no image files .*; it holds CT slices \\(.npy\\), which another task or data kind reads"):
        ImageFolderDataset(tmp_path, color="gray")


def test_the_baselines_say_when_their_prior_is_not_the_one_idm_was_fine_tuned_from(prior_run, data, tmp_path, capsys):
    """A model records its prior's fingerprint; idm benchmark warns (and records) when DDNM and DPS would run
    another network, e.g. after the pretrain run went on and exported a newer prior."""
    import json
    import shutil

    from idm.pretrain import prior_fingerprint

    run = tmp_path / "prior-run"
    shutil.copytree(prior_run, run)
    model = tmp_path / "idm"
    args = [a if a != "." else str(data) for a in _train_args(run)]
    assert main([*args, "--out", str(model)]) == 0
    recorded = json.loads((model / "config.json").read_text())["settings"]["prior_sha256"]
    assert recorded == prior_fingerprint(run)
    bench = ["benchmark", "--checkpoint", str(model), "--data", str(data), "--methods", "ddnm", "--ddnm-steps", "2",
             "--device", "cpu", "--no-progress", "--no-images"]  # fmt: skip
    assert main([*bench, "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "benchmark.json").read_text())
    assert same["warnings"] == [] and same["prior_sha256"] == recorded
    assert main([*BASE, "--data", str(data), "--iters", "5", "--checkpoint-every", "2", "--out", str(run), "--resume"]) == 0
    capsys.readouterr()
    assert main([*bench, "--out", str(tmp_path / "newer")]) == 0
    assert "idm benchmark: warning: the prior" in capsys.readouterr().err
    assert "DDNM and DPS run it" in json.loads((tmp_path / "newer" / "benchmark.json").read_text())["warnings"][0]


def test_a_resumed_run_recorded_before_prior_fingerprints_records_none(prior_run, data, tmp_path):
    """The prior folder given to a later chunk is not necessarily the network the run was trained from: an older
    run's record stays without a fingerprint (idm benchmark then cannot tell, and says nothing)."""
    import json
    import shutil

    run = tmp_path / "prior-run"
    shutil.copytree(prior_run, run)
    model = tmp_path / "idm"
    args = [a if a != "." else str(data) for a in _train_args(run)] + ["--lr-milestones", "5"]
    assert main([*args, "--checkpoint-every", "1", "--out", str(model)]) == 0
    for record in (model / "config.json", *model.glob("checkpoints/*/run.json")):
        written = json.loads(record.read_text())
        del written["settings"]["prior_sha256"]  # as a run of an earlier version
        record.write_text(json.dumps(written))
    args[args.index("--iters") + 1] = "2"
    assert main([*args, "--checkpoint-every", "1", "--out", str(model), "--resume"]) == 0
    assert json.loads((model / "checkpoints" / "iter_0000002" / "run.json").read_text())["settings"]["prior_sha256"] is None


def test_a_training_run_beside_a_prior_folder_is_a_model(prior_run, data, tmp_path, monkeypatch):
    """Only a checkpoint inside a pretrain run's checkpoints/ is one: a training run two levels below a folder
    holding prior/ (an exported prior in the working folder) is still a model."""
    import shutil

    from idm.training.trained import resolve_model_dir

    shutil.copytree(prior_run / "prior", tmp_path / "prior")
    model = tmp_path / "runs" / "cs10"
    args = [a if a != "." else str(data) for a in _train_args(prior_run)]
    assert main([*args, "--out", str(model)]) == 0
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("runs/cs10").name == "iter_0000001"


def test_a_folder_whose_images_are_in_a_sub_folder_says_so_beside_other_kinds(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from tasks.data import DataError, list_images

    np.save(tmp_path / "a.npy", np.zeros((4, 4), np.float32))
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "sub" / "b.png")
    with pytest.raises(DataError, match=r"; the image files are in its sub-folder sub \(.*\); it holds CT slices"):
        list_images(tmp_path)
    (tmp_path / "locked").mkdir()
    real = Path.iterdir

    def unreadable(self):  # as chmod 000 for a user other than root
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", unreadable)
    with pytest.raises(DataError, match="the image files are in its sub-folder sub "):  # not a PermissionError
        list_images(tmp_path)


def test_pretrain_runs_recorded_with_amp_resume_and_bf16_is_recorded(tmp_path, data, capsys, monkeypatch):
    """Pretraining runs from before --precision recorded "amp": false (float32): they resume as --precision fp32;
    --precision bf16 runs under bfloat16 autocast on the CPU and says so in the run's settings."""
    from idm import hardware

    out = tmp_path / "run"
    common = [*BASE, "--data", str(data), "--out", str(out)]
    assert main([*common, "--iters", "1", "--precision", "fp32"]) == 0
    for record in (out / "config.json", *out.glob("checkpoints/*/run.json")):  # as the code before wrote them
        run = json.loads(record.read_text())
        assert run["identity"]["training"].pop("precision") == "fp32"
        run["identity"]["training"]["amp"] = False
        record.write_text(json.dumps(run))
    assert main([*common, "--iters", "2", "--resume"]) == 2  # auto now: not what the run recorded
    assert "training.precision: \"fp32\" in the run, \"auto\" now" in capsys.readouterr().err
    assert main([*common, "--iters", "2", "--resume", "--precision", "fp32"]) == 0

    monkeypatch.setattr(hardware, "has_native_bf16", lambda device: True)  # no emulation warning on any CPU
    bf16 = tmp_path / "bf16"
    assert main([*BASE, "--data", str(data), "--iters", "1", "--precision", "bf16", "--out", str(bf16)]) == 0
    run = json.loads((bf16 / "config.json").read_text())
    assert run["identity"]["training"]["precision"] == "bf16" and run["settings"]["arithmetic"] == "bf16"
