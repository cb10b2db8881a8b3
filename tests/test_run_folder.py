"""A training run's folder keeps what was trained: checked before training, written and pruned so that a killed
process leaves only complete checkpoints, damaged files named as such (from a user-journey review)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from idm.checkpoint import CheckpointError, save_tensors
from idm.cli import main
from idm.training.run_folder import RunFolder, replace_folder
from idm.training.trained import resolve_model_dir
from tests.test_train import BASE, snapshot, write_images


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "train")


def _run(tmp_path: Path, data: Path, iters: int = 2, *extra: str) -> list[str]:
    argv = [*BASE, "--data", str(data), "--checkpoint-every", "1", "--lr-milestones", "5", "--out", str(tmp_path / "run"), *extra]
    assert main([*argv, "--iters", str(iters)]) == 0
    return argv


def test_checkpoints_that_cannot_be_written_are_found_before_training(tmp_path, data, capsys, monkeypatch):
    argv = _run(tmp_path, data)
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "checkpoints").write_text("a file where the run writes its checkpoints")
    log = (tmp_path / "run" / "log.csv").read_text()
    assert main([*argv, "--iters", "4", "--resume"]) == 2
    assert "run/checkpoints' is not a folder: the run writes its checkpoints there" in capsys.readouterr().err
    assert (tmp_path / "run" / "log.csv").read_text() == log  # nothing was started

    (tmp_path / "run" / "checkpoints").unlink()
    argv = _run(tmp_path / "second", data)
    real_mkdtemp = tempfile.mkdtemp

    def read_only(prefix=None, dir=None, **kwargs):  # a folder that takes no new entry (as chmod a-w, also for root)
        if str(prefix).startswith(".tmp-probe-"):
            raise PermissionError(13, "Permission denied")
        return real_mkdtemp(prefix=prefix, dir=dir, **kwargs)

    monkeypatch.setattr("idm.training.run_folder.tempfile.mkdtemp", read_only)
    assert main([*argv, "--iters", "4", "--resume"]) == 2
    assert "cannot write checkpoints into" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*argv, "--iters", "3", "--resume"]) == 0  # the probe ran for real
    assert sorted(p.name for p in RunFolder(tmp_path / "second" / "run", "idm-train").checkpoints_dir.iterdir()) == [
        "iter_0000002", "iter_0000003"]  # no probe left behind


def test_a_failed_safetensors_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("idm.checkpoint.save_file", full_disk)
    with pytest.raises(OSError, match=r"cannot write '.*w.safetensors': .*No space left on device"):
        save_tensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_without_its_run_record_is_damaged(tmp_path, data, capsys):
    argv = _run(tmp_path, data)
    (tmp_path / "run" / "checkpoints" / "iter_0000002" / "run.json").unlink()
    with pytest.raises(CheckpointError, match="lacks run.json, the record of its task and operator: the checkpoint is damaged"):
        resolve_model_dir(tmp_path / "run")  # read as a bare model folder, it would serve any operator
    assert main([*argv, "--iters", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "run.json' does not exist" in err and "the checkpoint is damaged; delete that folder to resume from the previous" in err


def test_weights_that_are_not_finite_are_a_damaged_checkpoint(tmp_path, data, capsys):
    argv = _run(tmp_path, data)
    weights = tmp_path / "run" / "checkpoints" / "iter_0000002" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights)
    assert main([*argv, "--iters", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"hold NaN or inf ({name}): the file is damaged" in err and "delete that folder to resume" in err
    assert main(["reconstruct", "--input", str(data), "--checkpoint", str(tmp_path / "run"), "--device", "cpu",
                 "--out", str(tmp_path / "rec")]) == 2  # fmt: skip
    assert "hold NaN or inf" in capsys.readouterr().err


def _nan_in_first_tensor(path: Path) -> str:
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path)
    return name


def test_the_weights_the_optimizer_moves_are_checked_like_the_averaged_ones(tmp_path, data, capsys):
    argv = _run(tmp_path, data, 2, "--ema-decay", "0.9")
    name = _nan_in_first_tensor(tmp_path / "run" / "checkpoints" / "iter_0000002" / "training_weights.safetensors")
    assert main([*argv, "--iters", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"training_weights.safetensors hold NaN or inf ({name}): the file is damaged" in err
    assert "delete that folder to resume" in err and "diverged" not in err


def test_a_run_of_the_other_trainer_is_named_as_such_not_as_damage(tmp_path, data, capsys):
    from tests.test_pretrain import BASE as PRETRAIN

    prior_run = tmp_path / "prior-run"
    assert main([*PRETRAIN, "--data", str(data), "--iters", "1", "--checkpoint-every", "1", "--out", str(prior_run)]) == 0
    (prior_run / "config.json").unlink()  # only its checkpoints say what kind of run it is
    before = snapshot(prior_run)
    for resume in ([], ["--resume"]):
        assert main([*BASE, "--data", str(data), "--iters", "2", "--out", str(prior_run), *resume]) == 2
        err = capsys.readouterr().err
        assert "holds checkpoints of another kind of run" in err and "'idm-pretrain-run'" in err
        assert "delete" not in err and "pass --resume" not in err
    assert snapshot(prior_run) == before


def test_a_damaged_config_json_beside_intact_checkpoints_is_named_as_safe_to_delete(tmp_path, data, capsys):
    argv = _run(tmp_path, data)
    config = tmp_path / "run" / "config.json"
    config.write_text(config.read_text()[:100])  # truncated
    assert main([*argv, "--iters", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "config.json' is damaged" in err and "deleting that file loses nothing" in err
    config.unlink()
    assert main([*argv, "--iters", "3", "--resume"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "iter_0000003").is_dir() and config.is_file()


def test_a_log_that_is_not_text_is_named_and_the_run_resumes_once_it_is_moved(tmp_path, data, capsys):
    argv = _run(tmp_path, data)
    log = tmp_path / "run" / "log.csv"
    log.write_bytes(bytes(range(256)) * 4)
    before = snapshot(tmp_path / "run")
    assert main([*argv, "--iters", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "log.csv' is not a readable CSV file" in err and "move it away" in err
    assert snapshot(tmp_path / "run") == before  # config.json untouched too
    log.rename(tmp_path / "old-log.csv")
    assert main([*argv, "--iters", "3", "--resume"]) == 0


@pytest.mark.parametrize(
    "file, key, value, problem",
    [
        ("trainer_state.json", "seconds", None, "no valid training time"),
        ("trainer_state.json", "iteration", 10, "says iteration 10, its folder iter_0000002"),
        ("trainer_state.json", "iteration", -5, "has no iteration number"),
        ("trainer_state.json", "optimizer.scalars", [], "optimizer record in the checkpoint is malformed"),
        ("run.json", "identity", [1], "its identity is not a JSON object"),
        ("run.json", "settings", [1], "its settings is not a JSON object"),
    ],
)  # fmt: skip
def test_hand_edited_records_of_the_wrong_type_are_named(tmp_path, data, capsys, file, key, value, problem):
    argv = _run(tmp_path, data)
    path = tmp_path / "run" / "checkpoints" / "iter_0000002" / file
    record = json.loads(path.read_text())
    *parents, last = key.split(".")
    inner = record
    for part in parents:
        inner = inner[part]
    inner[last] = value
    path.write_text(json.dumps(record))
    assert main([*argv, "--iters", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert problem in err and "the checkpoint is damaged" in err and "Traceback" not in err


def test_an_optimizer_state_that_is_not_finite_is_a_damaged_checkpoint(tmp_path, data, capsys):
    argv = _run(tmp_path, data)
    state = tmp_path / "run" / "checkpoints" / "iter_0000002" / "optimizer.safetensors"
    tensors = load_file(state)
    name = next(k for k, v in sorted(tensors.items()) if v.is_floating_point() and v.numel() > 1)
    tensors[name][0] = float("inf")
    save_file(tensors, state)
    assert main([*argv, "--iters", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"the optimizer state in {state} holds NaN or inf ({name})" in err and "delete that folder to resume" in err


def test_a_process_killed_while_pruning_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run", "idm-train")

    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"weights")

    for iteration in (1, 2):
        folder.save_checkpoint(iteration, write, {}, keep=2)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("idm.training.run_folder.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        folder.save_checkpoint(3, write, {}, keep=2)  # iteration 1 is pruned: killed while it is deleted
    assert [i for i, _ in folder.checkpoints()] == [2, 3]  # no partial iter_0000001 under its own name
    assert any(p.name.startswith(".old-iter_0000001-") for p in folder.checkpoints_dir.iterdir())
    monkeypatch.setattr("idm.training.run_folder.shutil.rmtree", real_rmtree)
    folder.save_checkpoint(4, write, {}, keep=2)
    assert sorted(p.name for p in folder.checkpoints_dir.iterdir()) == ["iter_0000003", "iter_0000004"]


def test_replace_folder_removes_what_interrupted_calls_left(tmp_path):
    (tmp_path / ".tmp-prior-abc12_45").mkdir()  # a pretrain killed while exporting its prior
    (tmp_path / ".old-prior-def45678").mkdir()
    (tmp_path / ".tmp-prior-2-abcdefgh").mkdir()  # another export's, maybe in progress: not this folder's
    (tmp_path / ".tmp-priors-abcdefgh").mkdir()
    replace_folder(tmp_path / "prior", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-prior-2-abcdefgh", ".tmp-priors-abcdefgh", "prior"]


def test_a_resumed_run_refuses_a_prior_of_another_architecture(tmp_path, data, capsys):
    from diffusers import UNet2DModel

    from idm.unets import tiny_unet_config

    torch.manual_seed(0)
    UNet2DModel(**tiny_unet_config(1)).save_pretrained(tmp_path / "prior")
    UNet2DModel(**{**tiny_unet_config(1), "block_out_channels": [16, 32]}).save_pretrained(tmp_path / "other")
    args = [a for a in BASE if a not in ("--unet", "tiny")]
    argv = [*args, "--data", str(data), "--lr-milestones", "5", "--out", str(tmp_path / "run")]
    assert main([*argv, "--prior", str(tmp_path / "prior"), "--iters", "1"]) == 0
    shutil.move(tmp_path / "prior", tmp_path / "moved")  # a prior may move between chunks
    assert main([*argv, "--prior", str(tmp_path / "moved"), "--iters", "2", "--resume"]) == 0
    assert main([*argv, "--prior", str(tmp_path / "other"), "--iters", "3", "--resume"]) == 2
    assert "is another U-Net than the one the run in" in capsys.readouterr().err


def test_the_time_budget_counts_from_the_start_of_the_command(monkeypatch):
    """`idm train ...` counts its --max-minutes from the process's start (imports take seconds); main([...]) called
    inside a running program counts from the call, so a notebook's earlier work does not use up its budget."""
    from idm.cli.common import command_started_at

    monkeypatch.setattr("sys.argv", ["idm", "train", "--task", "cs"])
    assert 0.5 < time.monotonic() - command_started_at("train") < time.monotonic()  # this process imported torch
    monkeypatch.setattr("sys.argv", ["pytest", "-q"])
    assert time.monotonic() - command_started_at("train") < 0.1


def test_a_lost_process_of_a_torchrun_run_is_named_in_one_line():
    from idm.training.distributed import DistEnv, PeerLostError, named_peer_loss

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:38305: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging")  # what rank 0 raised from backward()
    named = named_peer_loss(gloo, DistEnv(rank=0, world_size=2))
    assert isinstance(named, PeerLostError) and isinstance(named, OSError)  # idm train prints it as one line
    assert str(named).startswith("process 0 of 2: another process of this run stopped, so this one stops too (")
    assert "rerun with --resume" in str(named)
    assert named_peer_loss(gloo, DistEnv()) is gloo  # one process: nothing to blame on another
    import torch.distributed as dist

    for other in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), dist.DistBackendError("NCCL invalid usage"),
                  dist.DistStoreError("rendezvous timed out"), RuntimeError("reading a file: Connection reset by peer")):
        assert named_peer_loss(other, DistEnv(rank=1, world_size=2)) is other  # not a lost process: its own traceback
    network = dist.DistNetworkError("Connection closed by peer")
    assert isinstance(named_peer_loss(network, DistEnv(rank=1, world_size=2)), PeerLostError)


def test_a_second_process_on_a_running_run_stops_before_writing(tmp_path, data, capsys):
    """A requeued job overlapping the first on one --out: the second stops with a clear error, the first's files
    untouched; once the first has stopped, the run resumes."""
    argv = _run(tmp_path, data)
    running = RunFolder(tmp_path / "run", "idm-train")
    running._take_lock()  # what the first process holds while it trains
    (tmp_path / "run" / "checkpoints" / "iter_0000002" / "trainer_state.json").write_text("{")  # being written
    log = (tmp_path / "run" / "log.csv").read_text()
    assert main([*argv, "--iters", "3", "--resume"]) == 2
    assert "another process is running the run in" in capsys.readouterr().err  # before it read any checkpoint
    assert (tmp_path / "run" / "log.csv").read_text() == log
    running.unlock()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "iter_0000002")
    assert main([*argv, "--iters", "3", "--resume"]) == 0


def test_a_checkpoint_written_by_another_process_before_the_lock_stops_the_start(tmp_path):
    """Two starts in a folder without a run: the second to take the lock finds the first's checkpoint."""
    starting = RunFolder(tmp_path / "run", "idm-train")
    assert starting.prepare({}, resume=True, lock=True) is None  # nothing to lock yet
    RunFolder(tmp_path / "run", "idm-train").save_checkpoint(1, lambda tmp: None, {}, keep=2)  # the other process
    with pytest.raises(CheckpointError, match="another process wrote .*iter_0000001 .*rerun with --resume"):
        starting.begin({}, None, 0, 10, say=lambda _: None)
    assert not (tmp_path / "run" / "config.json").exists()
