"""``idm export``: fp16 model folders with provenance, shipped priors found by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import operators
from idm.checkpoint import CheckpointError
from idm.cli import main
from idm.export import KEEP_FP32_NUMEL, _half, export_model, export_prior
from idm.train import load_trained
from tests import test_pretrain
from tests.test_train import write_images


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-iteration pretrain run and a 1-iteration IDM fine-tuned from it."""
    root = tmp_path_factory.mktemp("export")
    data = write_images(root / "data", n=3, size=20)
    prior = root / "prior-run"
    assert main([*test_pretrain.BASE, "--data", str(data), "--iters", "2", "--out", str(prior)]) == 0
    idm_run = root / "idm-run"
    assert main(["train", "--task", "cs", "--ratio", "0.1:0.5", "--block", "8", "--prior", str(prior), "--steps", "2",
                 "--crop", "16", "--batch-size", "2", "--iters", "1", "--device", "cpu", "--num-workers", "0",
                 "--no-progress", "--data", str(data), "--out", str(idm_run)]) == 0  # fmt: skip
    return prior, idm_run


def test_half_precision_export_keeps_scalars_and_outputs(runs, tmp_path, capsys):
    _, idm_run = runs
    out = tmp_path / "weights" / "cs-any"
    assert main(["export", "--checkpoint", str(idm_run), "--prior-name", "prior-x", "--hardware", "test CPU",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "MiB of weights" in capsys.readouterr().out
    tensors = load_file(str(out / "model.safetensors"))
    assert {t.dtype for k, t in tensors.items() if t.numel() > KEEP_FP32_NUMEL} == {torch.float16}
    long_scalars = _half({"schedule.alpha": torch.rand(40), "eps_net.wirings.b.v": torch.rand(20), "conv.weight": torch.rand(40)})
    assert [t.dtype for t in long_scalars.values()] == [torch.float32, torch.float32, torch.float16]  # 40 steps: alpha kept
    assert all(t.dtype == torch.float32 for t in tensors.values() if t.numel() <= KEEP_FP32_NUMEL)
    assert tensors["schedule.alpha"].dtype == tensors["wiring.v"].dtype == torch.float32
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["iteration"] == 1 and provenance["hardware"] == "test CPU" and provenance["prior"] == "prior-x"
    assert provenance["command"].startswith("idm train") and provenance["training_seconds"] > 0

    original = load_trained(idm_run).model.eval()
    exported = load_trained(out, expect_task="cs", expect_operator={"ratio": 0.2}).model.eval()
    assert exported.config.unet == "prior-x" and next(exported.parameters()).dtype == torch.float32
    op = operators.make("cs", img_size=(16, 16), channels=1, ratio=0.2, block=8)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        a, b = original(op.A(x), op), exported(op.A(x), op)
    assert 0 < float((a - b).abs().max()) < 5e-3  # float16 rounding of the weights, nothing more

    # re-exported with --fp32 (as a shipped model can be): float32 tensors, as provenance.json says
    again = tmp_path / "weights" / "cs-any-fp32"
    assert main(["export", "--checkpoint", str(out), "--fp32", "--out", str(again)]) == 0
    assert {t.dtype for t in load_file(str(again / "model.safetensors")).values()} == {torch.float32}
    assert json.loads((again / "provenance.json").read_text())["weights_dtype"] == "float32"


def test_a_prior_name_that_finds_no_prior_or_another_one_is_warned_about(runs, tmp_path, monkeypatch, capsys):
    """--prior-name is what idm benchmark's ddnm/dps look up: a name that finds nothing, or a prior of another
    architecture (a shipped one of that name), is said at export; the model's own prior exported beside it is fine."""
    from idm import shipped

    prior_run, idm_run = runs
    monkeypatch.delenv(shipped.MODELS_ENV, raising=False)
    assert main(["export", "--checkpoint", str(idm_run), "--prior-name", "my-prior", "--out", str(tmp_path / "m" / "cs")]) == 0
    assert "no prior named 'my-prior' is in $IDM_MODELS_DIR or shipped" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(prior_run), "--out", str(tmp_path / "m" / "my-prior")]) == 0
    other = tmp_path / "elsewhere" / "other-prior"  # the same prior, one block wider: another architecture
    shutil.copytree(tmp_path / "m" / "my-prior", other)
    config = json.loads((other / "config.json").read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    (other / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv(shipped.MODELS_ENV, str(other.parent))
    assert main(["export", "--checkpoint", str(idm_run), "--prior-name", "other-prior", "--out", str(tmp_path / "m" / "cs")]) == 0
    assert "whose architecture differs from that of the prior this model was trained on" in capsys.readouterr().err
    monkeypatch.delenv(shipped.MODELS_ENV)
    assert main(["export", "--checkpoint", str(idm_run), "--prior-name", "my-prior", "--out", str(tmp_path / "m" / "cs")]) == 0
    assert "set IDM_MODELS_DIR=" in capsys.readouterr().err  # it lies beside the model: say where to point
    monkeypatch.setenv(shipped.MODELS_ENV, str(tmp_path / "m"))
    assert main(["export", "--checkpoint", str(idm_run), "--prior-name", "my-prior", "--out", str(tmp_path / "m" / "cs")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_pretrain_run_given_as_an_idm_model_says_it_is_a_prior(runs):
    from idm.train import resolve_model_dir

    prior_run, _ = runs
    with pytest.raises(CheckpointError, match="is an `idm pretrain` run, a diffusion prior, not an IDM model: pass it as --prior"):
        resolve_model_dir(prior_run)


def test_prior_export_is_a_diffusers_folder_found_by_name(runs, tmp_path, monkeypatch, capsys):
    from diffusers import UNet2DModel

    from idm import shipped

    prior_run, _ = runs
    out = tmp_path / "models" / "prior-x"
    assert main(["export", "--checkpoint", str(prior_run), "--out", str(out)]) == 0
    unet = UNet2DModel.from_pretrained(out)
    assert unet.config.in_channels == 1 and next(unet.parameters()).dtype == torch.float32
    stored = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values() if t.numel() > KEEP_FP32_NUMEL} == {torch.float16}
    assert main(["export", "--checkpoint", str(prior_run), "--final-projection", "--out", str(tmp_path / "p")]) == 2
    assert "--final-projection applies to IDM models, not priors" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(prior_run), "--prior-name", "x", "--out", str(tmp_path / "p")]) == 2
    assert "--prior-name applies to IDM models, not priors" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    full = tmp_path / "prior-fp32"
    assert main(["export", "--checkpoint", str(prior_run), "--fp32", "--out", str(full)]) == 0
    reference = UNet2DModel.from_pretrained(full)
    assert {t.dtype for t in load_file(str(full / "diffusion_pytorch_model.safetensors")).values()} == {torch.float32}
    gaps = [float((a - b).abs().max()) for a, b in zip(unet.state_dict().values(), reference.state_dict().values())]
    assert 0 < max(gaps) < 1e-2  # float16 rounding, nothing more
    assert json.loads((out / "provenance.json").read_text())["iteration"] == 2
    monkeypatch.setenv(shipped.MODELS_ENV, str(tmp_path / "models"))
    assert shipped.find_prior("prior-x") == out
    from benchmarks.prior import load_prior

    assert load_prior("prior-x").unet.config.in_channels == 1  # --prior takes a shipped prior's name
    assert shipped.find_prior("missing") is None and shipped.find_prior("tiny") is None
    assert shipped.shipped_models() == []  # a prior is not an IDM model


def test_a_model_and_the_half_precision_export_of_its_prior_are_known_to_belong_together(runs, tmp_path, monkeypatch):
    """The model records the fingerprint of the run's float32 prior; the float16 export of that prior records it
    too, so idm benchmark's DDNM runs it without a warning that it is another network."""
    from idm import shipped
    from idm.export import exported_prior_fingerprint
    from idm.pretrain import prior_fingerprint

    prior_run, idm_run = runs
    models = tmp_path / "models"
    assert main(["export", "--checkpoint", str(prior_run), "--out", str(models / "my-prior")]) == 0
    assert main(["export", "--checkpoint", str(idm_run), "--prior-name", "my-prior", "--out", str(models / "my-cs")]) == 0
    recorded = load_trained(idm_run).run["settings"]["prior_sha256"]
    assert recorded != prior_fingerprint(models / "my-prior") and recorded == exported_prior_fingerprint(models / "my-prior")
    assert exported_prior_fingerprint(prior_run) is None  # the run's own prior is no export
    monkeypatch.setenv(shipped.MODELS_ENV, str(models))
    out = tmp_path / "bench"
    assert main(["benchmark", "--task", "cs", "--ratio", "0.2", "--block", "8", "--data", str(prior_run.parent / "data"),
                 "--limit", "1", "--methods", "pinv,ddnm", "--ddnm-steps", "2", "--checkpoint", "my-cs", "--device", "cpu",
                 "--no-progress", "--no-images", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "benchmark.json").read_text())["warnings"] == []


def test_export_refuses_what_it_cannot_describe(tmp_path, runs):
    from idm import IDM, IDMConfig

    bare = tmp_path / "bare"
    IDM(IDMConfig(unet="tiny", steps=1)).save_pretrained(bare)
    with pytest.raises(CheckpointError, match="run.json"):
        export_model(bare, tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_model(tmp_path / "nothing", tmp_path / "out")
    assert main(["export", "--checkpoint", str(runs[1]), "--device", "nonsense", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    checkpoint = next((runs[1] / "checkpoints").iterdir())
    for damage, message in (
        (lambda c: (c / "run.json").write_text("[1, 2]"), "is not an idm train run config"),
        (lambda c: _edit_config(c, lambda idm: idm.pop("unet")), "its 'idm' settings must name the prior"),
        (lambda c: _edit_config(c, lambda idm: idm.update(pinv_mapping="images")),
         "config.json is not the config that model.safetensors was saved with"),  # hand-edited: not made to look valid
    ):  # fmt: skip
        copy = shutil.copytree(checkpoint, tmp_path / "damaged", dirs_exist_ok=False)
        damage(copy)
        with pytest.raises(CheckpointError, match=message):
            export_model(copy, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        shutil.rmtree(copy)


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config["idm"])
    (folder / "config.json").write_text(json.dumps(config))


def test_export_never_replaces_a_run_or_another_folder(runs, tmp_path):
    """Only an earlier export is replaced (re-exporting a shipped model in place is fine)."""
    import shutil

    prior, idm_run = runs
    run = tmp_path / "run"
    shutil.copytree(idm_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(CheckpointError, match="holds the checkpoint being exported"):
        export_model(run, run)  # the run into itself: its checkpoints would go
    with pytest.raises(CheckpointError, match="holds the checkpoint being exported"):
        export_model(run, tmp_path)  # a folder above the run
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "sub" / "data.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not an earlier export"):
        export_model(run, precious)
    with pytest.raises(CheckpointError, match="is not an earlier export"):
        export_prior(prior, precious)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before and (precious / "sub" / "data.txt").is_file()
    shipped = export_model(run, tmp_path / "shipped")
    assert export_model(shipped, shipped, final_projection=False) == shipped  # an export replaced in place
    assert load_trained(shipped).model.config.final_projection is False
    exported_prior = export_prior(prior, tmp_path / "exported-prior")
    kept = sorted(p.name for p in exported_prior.iterdir())
    with pytest.raises(CheckpointError, match="is an exported prior, which an exported model would replace"):
        export_model(run, exported_prior)  # e.g. the prior every shipped model names
    with pytest.raises(CheckpointError, match="is an exported model, which an exported prior would replace"):
        export_prior(prior, shipped)
    assert sorted(p.name for p in exported_prior.iterdir()) == kept and (shipped / "run.json").is_file()


def test_reexport_switches_the_final_projection_and_keeps_the_training_record(runs, tmp_path, monkeypatch):
    _, idm_run = runs
    shipped = export_model(idm_run, tmp_path / "shipped")
    assert load_trained(shipped).model.config.final_projection is True  # cs's task default
    switched = export_model(shipped, tmp_path / "switched", final_projection=False)
    model = load_trained(switched, expect_task="cs").model.eval()
    assert model.config.final_projection is False
    recorded = json.loads((switched / "run.json").read_text())["model_config"]["idm"]
    before_run = json.loads((shipped / "run.json").read_text())["model_config"]["idm"]
    assert recorded == {**before_run, "final_projection": False}  # the training record keeps every other field
    provenance = json.loads((switched / "provenance.json").read_text())
    before = json.loads((shipped / "provenance.json").read_text())
    assert provenance["iteration"] == before["iteration"] == 1 and provenance["command"] == before["command"]
    assert provenance["exported_from"] == [str(shipped.resolve())] and provenance["final_projection"] is False
    again = json.loads((export_model(switched, tmp_path / "again") / "provenance.json").read_text())
    assert again["exported_from"] == [str(shipped.resolve()), str(switched.resolve())]  # the whole way back
    for _ in range(2):  # re-exported in place twice: the folder is listed once
        in_place = json.loads((export_model(tmp_path / "again", tmp_path / "again") / "provenance.json").read_text())
    assert in_place["exported_from"] == [*again["exported_from"], str((tmp_path / "again").resolve())]
    monkeypatch.chdir(tmp_path)  # a folder inside the working directory is recorded relative to it (shipped weights)
    inside = json.loads((export_model("again", "again") / "provenance.json").read_text())
    assert inside["exported_from"] == in_place["exported_from"]  # already listed: once
    relative = json.loads((export_model("switched", "switched") / "provenance.json").read_text())
    assert relative["exported_from"] == [str(shipped.resolve()), "switched"]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the relative record still names that folder: listed once
    moved = export_model(tmp_path / "switched", tmp_path / "switched", hardware="the test's CPU")
    provenance = json.loads((moved / "provenance.json").read_text())
    assert provenance["exported_from"] == relative["exported_from"] and provenance["hardware"] == "the test's CPU"
    assert json.loads((moved / "run.json").read_text())["settings"]["hardware"] == "the test's CPU"
    op = operators.make("cs", img_size=(16, 16), channels=1, ratio=0.2, block=8)
    y = op.A(torch.rand(2, 1, 16, 16))
    with torch.no_grad():
        on, off = load_trained(shipped).model.eval()(y, op), model(y, op)
    assert float((op.A(on) - y).norm() / y.norm()) < 1e-5 < float((op.A(off) - y).norm() / y.norm())


def test_idm_info_lists_models_and_priors_by_where_they_come_from(runs, tmp_path, monkeypatch, capsys):
    from idm import shipped

    prior_run, idm_run = runs
    packaged, user = tmp_path / "packaged", tmp_path / "user"
    export_model(idm_run, packaged / "cs-any")
    export_prior(prior_run, packaged / "prior-a")
    export_model(idm_run, user / "cs-any")  # the user's model of the same name: it is the one `cs-any` names
    monkeypatch.setattr(shipped, "PACKAGED_DIR", packaged)
    monkeypatch.setenv(shipped.MODELS_ENV, str(user))
    assert main(["info", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"models in $IDM_MODELS_DIR ({user}): cs-any (cs)" in lines
    assert "shipped models: cs-any [hidden by $IDM_MODELS_DIR] (cs)" in lines and "shipped priors: prior-a" in lines
    with pytest.raises(CheckpointError, match="'prior-a' is a shipped diffusion prior, not an IDM model: pass it as --prior"):
        load_trained("prior-a")
    from idm import IDM, IDMConfig

    IDM(IDMConfig(unet="tiny", steps=1)).save_pretrained(user / "bare")  # a model folder without run.json: no prior
    with pytest.raises(CheckpointError, match="'bare' does not exist, nor is it the name of a shipped model"):
        load_trained("bare")


def test_idm_info_describes_a_checkpoint(runs, tmp_path, capsys):
    """`idm info --checkpoint` says what a model was trained for, how it is built and wired, and how it was
    trained: from a run folder, from its export (provenance.json), and from a bare model folder (no record)."""
    from idm import IDM, IDMConfig

    _, idm_run = runs
    exported = export_model(idm_run, tmp_path / "exported")
    for source in (idm_run, exported):
        assert main(["info", "--checkpoint", str(source), "--out", str(tmp_path / "info.json")]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1] == ("task: cs; operator: a family: cs operator (block=8, channels=1, img_size=16x16, mode=permuted, "
                            "phi_seed=0, seed=0, ratio drawn from [0.1, 0.5])")  # fmt: skip
        assert lines[2].startswith("network: T=") and lines[3].split()[:2] == ["group", "modules"]
        assert any(line.startswith("trained: ") and " iterations" in line and " in fp32" in line for line in lines)
        info = json.loads((tmp_path / "info.json").read_text())
        assert info["training"]["arithmetic"] == "fp32"  # --precision auto on the CPU
        assert info["task"] == "cs" and info["parameters"] == sum(p.numel() for p in load_trained(source).model.parameters())
        assert info["training"]["command"].startswith("idm train") and info["training"]["iteration"] >= 1
        assert info["training"]["seconds"] > 0  # the export's provenance, or the checkpoint's trainer state
    IDM(IDMConfig(unet="tiny", steps=1)).save_pretrained(tmp_path / "bare")
    assert main(["info", "--checkpoint", str(tmp_path / "bare")]) == 0
    assert "task: not recorded (a bare model folder: no run.json)" in capsys.readouterr().out
    assert main(["info", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for checkpoint in ([], ["--checkpoint", str(exported)]):  # a folder as --out: named before anything is printed
        assert main(["info", "--device", "cpu", *checkpoint, "--out", str(tmp_path)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "is a folder; idm info --out takes the name of a JSON file" in captured.err
    (exported / "provenance.json").write_text("[1, 2]")
    assert main(["info", "--checkpoint", str(exported)]) == 2
    assert "is not a JSON object; the folder is damaged" in capsys.readouterr().err
    damaged_run = shutil.copytree(idm_run, tmp_path / "damaged-run")
    for state in damaged_run.glob("checkpoints/*/trainer_state.json"):
        state.write_text('"not a state"')
    assert main(["export", "--checkpoint", str(damaged_run), "--out", str(tmp_path / "from-damaged")]) == 2
    assert "trainer state file" in capsys.readouterr().err and not (tmp_path / "from-damaged").exists()


@pytest.fixture(scope="module")
def three_checkpoints(runs, tmp_path_factory):
    """A 3-iteration IDM run from the module's prior, checkpointed after every iteration (the last two kept)."""
    prior, _ = runs
    root = tmp_path_factory.mktemp("average")
    data = write_images(root / "data", n=3, size=20)
    run = root / "run"
    assert main(["train", "--task", "cs", "--ratio", "0.25", "--block", "8", "--prior", str(prior), "--steps", "2",
                 "--crop", "16", "--batch-size", "2", "--iters", "3", "--checkpoint-every", "1", "--lr", "1e-2",
                 "--device", "cpu", "--num-workers", "0", "--no-progress", "--data", str(data), "--out", str(run)]) == 0  # fmt: skip
    return run


def test_average_from_exports_the_mean_of_the_later_checkpoints(three_checkpoints, tmp_path, capsys):
    run = three_checkpoints
    out = tmp_path / "average"
    assert main(["export", "--checkpoint", str(run), "--average-from", "2", "--fp32", "--out", str(out)]) == 0
    capsys.readouterr()
    second, third = (load_file(str(run / "checkpoints" / f"iter_000000{i}" / "model.safetensors")) for i in (2, 3))
    averaged = load_file(str(out / "model.safetensors"))
    assert set(averaged) == set(third)
    moved = [key for key in third if not torch.equal(second[key], third[key])]
    assert moved  # the two checkpoints differ, so the mean is neither of them
    for key, tensor in averaged.items():
        expected = (second[key].double() + third[key].double()) / 2
        assert tensor.dtype == third[key].dtype and torch.allclose(tensor.double(), expected, rtol=0, atol=1e-7), key
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["averaged_iterations"] == [2, 3] and provenance["iteration"] == 3
    assert main(["info", "--checkpoint", str(out)]) == 0
    assert "exported as the mean of the weights of its checkpoints at iterations 2, 3" in capsys.readouterr().out
    model = load_trained(out, expect_task="cs", expect_operator={"ratio": 0.25}).model.eval()
    op = operators.make("cs", img_size=(16, 16), channels=1, ratio=0.25, block=8)
    with torch.no_grad():
        assert torch.isfinite(model(op.A(torch.rand(1, 1, 16, 16)), op)).all()


def test_average_from_refuses_what_cannot_be_averaged(three_checkpoints, runs, tmp_path, capsys):
    run = three_checkpoints
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"--average-from 3 leaves 1 checkpoint\(s\) .* keeps iterations 2, 3"):
        export_model(run, out, average_from=3)
    with pytest.raises(CheckpointError, match="is not a training --out folder"):
        export_model(run / "checkpoints" / "iter_0000003", out, average_from=1)
    assert main(["export", "--checkpoint", str(runs[0]), "--average-from", "1", "--out", str(out)]) == 2
    assert "is an `idm pretrain` run: --average-from applies to IDM models, not priors" in capsys.readouterr().err
    for damaged, damage, message in (
        ("iter_0000002", lambda c: _poison(c / "model.safetensors"), r"hold NaN or inf \(.*\): the file is damaged; leave that checkpoint out of the average"),
        ("iter_0000002", lambda c: _edit_config(c, lambda idm: idm.update(pinv_mapping="images")), "config.json is not the config"),
        ("iter_0000003", lambda c: _edit_weights(c / "model.safetensors", lambda tensors: tensors.popitem()),
         r"iter_0000003/model.safetensors do not fit the network of .*iter_0000002/model.safetensors: 1 missing"),
    ):  # fmt: skip
        copy = shutil.copytree(run, tmp_path / "damaged")
        damage(copy / "checkpoints" / damaged)
        with pytest.raises(CheckpointError, match=message):
            export_model(copy, out, average_from=1)
        assert not out.exists()
        shutil.rmtree(copy)


def _edit_weights(weights, edit):
    """Apply ``edit`` to the tensors of a ``model.safetensors`` and save them back, keeping its metadata."""
    from idm.checkpoint import load_metadata, save_tensors

    tensors = load_file(str(weights))
    edit(tensors)
    save_tensors(tensors, weights, metadata=load_metadata(weights))


def _poison(weights):
    """Write NaN into the first floating tensor of a ``model.safetensors``, keeping its metadata."""

    def nan_first(tensors):
        key = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
        tensors[key] = torch.full_like(tensors[key], float("nan"))

    _edit_weights(weights, nan_first)
