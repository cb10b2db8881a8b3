"""Operator families: one model trained for a range of ratios or a mixture of masks."""

from __future__ import annotations

import json

import pytest
import torch

import operators
import tasks
from idm import IDM, IDMConfig
from idm.checkpoint import CheckpointError
from idm.cli import main
from idm.train import load_trained
from operators import OperatorInputError
from operators.family import Component, OperatorFamily, config_mismatches, representative_config, serving_share
from tests.test_train import BASE, write_images


def cs_family(seed: int = 3) -> OperatorFamily:
    return tasks.get("cs").make_training_operator(32, seed=seed, ratio=(0.05, 0.5), block=8)


def test_draws_cover_the_range_and_are_reproducible():
    fam = cs_family()
    ratios = [fam.resample(s).ratio for s in range(200)]
    assert 0.05 <= min(ratios) < 0.08 and 0.47 < max(ratios) <= 0.5
    assert fam.resample(7).config() == fam.resample(7).config()
    assert fam.resample(7).config() != fam.resample(8).config()
    again = operators.from_config(json.loads(json.dumps(fam.config())))
    assert again.resample(11).config() == fam.resample(11).config()


def test_integer_settings_draw_integers_and_seedless_operators_get_no_seed():
    views = tasks.get("ct").make_training_operator(16, views=(4, 8))  # CT's projector takes no seed
    assert views.config()["components"][0]["base"]["views"] == 6  # the representative: the middle, an integer
    drawn = [views.resample(s).config()["views"] for s in range(60)]
    assert set(drawn) == {4, 5, 6, 7, 8} and all(type(v) is int for v in drawn)
    accelerations = {tasks.get("mri").make_training_operator(16, acceleration=(4, 6)).resample(s).acceleration for s in range(30)}
    assert accelerations == {4, 5, 6}
    base = operators.make("ct", img_size=(16, 16), views=4).config()
    with pytest.raises(OperatorInputError, match="integer setting 'views' holds no integer"):
        Component(base, {"views": (4.2, 4.8)})


def test_members_are_exact_operators_and_the_family_acts_as_its_representative():
    fam = cs_family()
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    assert torch.equal(fam.A(x), fam.representative.A(x))
    assert fam.representative.ratio == pytest.approx(0.275)
    member = fam.resample(5)
    y = member.A(x)
    assert torch.allclose(member.A(member.A_dagger(y)), y, atol=1e-10)  # each draw is a true CS operator
    rebuilt = operators.from_config(member.config())  # from scratch: its own QR
    assert member._bases is fam.representative._bases and rebuilt._bases is not member._bases
    assert torch.equal(member.A(x), rebuilt.A(x)) and torch.equal(member.A_dagger(y), rebuilt.A_dagger(y))


def test_a_ct_family_says_its_fbp_is_no_pseudo_inverse_so_the_final_projection_solves_least_squares():
    fam = tasks.get("ct").make_training_operator(16, views=(6, 10))
    assert isinstance(fam, OperatorFamily) and not fam.exact_pinv and not operators.has_exact_pinv(fam)
    assert operators.has_exact_pinv(cs_family())
    operators.check_operator(fam)  # the contract asks A A^+ A = A only of an exact pinv
    model = IDM(IDMConfig(steps=1, final_projection=True)).double().eval()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = fam.A(x)
    residuals = [float((op.A(model.project_onto_measurements(torch.zeros_like(x), y, op)) - y).norm() / y.norm())
                 for op in (fam, fam.representative)]
    assert residuals[0] == pytest.approx(residuals[1], rel=1e-9) and residuals[0] < 0.01  # FBP alone leaves ~0.1


def test_requests_inside_the_family_are_accepted_and_others_named():
    recorded = cs_family().config()
    assert config_mismatches(recorded, {"name": "cs", "ratio": 0.1, "mode": "permuted", "block": 8, "seed": 9}) == []
    problems = config_mismatches(recorded, {"name": "cs", "ratio": 0.7, "block": 32})
    assert problems == ["operator ratio: trained with 0.05..0.5, requested 0.7", "operator block: trained with 8, requested 32"]
    assert representative_config(recorded)["ratio"] == pytest.approx(0.275)


def test_mask_mixture_serves_random_masks_and_boxes():
    fam = tasks.get("inpainting").make_training_operator(32, seed=0, ratio=(0.2, 0.5), mask="random,box")
    kinds = {fam.resample(s).config()["mask"] for s in range(20)}
    assert kinds == {"random", "box"}
    positions = {fam.resample(s).config().get("box_position") for s in range(40)} - {None}
    assert positions == {"center", "random"}
    # boxes at random positions get a seed of their draw (the centred box's config has none to vary)
    random_boxes = [op for op in map(fam.resample, range(60)) if op.kind == "box" and op.box_position == "random"]
    assert len({int(op.mask.argmin()) for op in random_boxes}) > len(random_boxes) // 2 > 5
    recorded = fam.config()
    assert config_mismatches(recorded, {"name": "inpainting", "mask": "box", "ratio": 0.5}) == []  # ratio: not a box setting
    assert config_mismatches(recorded, {"name": "inpainting", "mask": "random", "ratio": 0.2}) == []
    assert config_mismatches(recorded, {"name": "inpainting", "mask": "random", "ratio": 0.8}) != []
    file_mask = tasks.get("inpainting").make_operator(32, mask=torch.rand(32, 32) > 0.5).config()["mask"]  # packed bits
    (problem,) = config_mismatches(recorded, {"name": "inpainting", "mask": file_mask})
    assert problem.endswith("requested a 32x32 mask array (a mask file)") and len(problem) < 120


def test_weighted_mask_mixture_draws_the_kinds_in_proportion_and_records_the_weights():
    fam = tasks.get("inpainting").make_training_operator(16, seed=0, ratio=(0.2, 0.5), mask="random:1,box:3")
    assert [c.weight for c in fam.components] == [1.0, 3.0]
    boxes = sum(fam.resample(s).kind == "box" for s in range(400))
    assert 270 < boxes < 330  # 3/4 of 400 = 300; equal weights would give about 200
    assert [c.weight for c in operators.from_config(json.loads(json.dumps(fam.config()))).components] == [1.0, 3.0]
    unweighted = tasks.get("inpainting").make_training_operator(16, seed=0, ratio=(0.2, 0.5), mask="random, box:1")
    assert [c.weight for c in unweighted.components] == [1.0, 1.0]


@pytest.mark.parametrize(
    "mask, problem",
    [("random:0,box", r"weight of 'random' must be a positive number, got '0'"),
     ("random,box:-1", r"weight of 'box' must be a positive number, got '-1'"),
     ("random:nan,box", r"weight of 'random' must be a positive number, got 'nan'"),
     ("random:inf,box", r"weight of 'random' must be a positive number, got 'inf'"),
     ("random:x,box", r"weight of 'random' must be a positive number, got 'x'"),
     ("random,,box", r"an empty item"),
     ("box,random,box:2", r"'box' is named twice; give it a weight instead \(box:2\)")],
)  # fmt: skip
def test_bad_mask_mixtures_are_named(mask, problem):
    with pytest.raises(ValueError, match=problem):
        tasks.get("inpainting").make_training_operator(16, seed=0, ratio=(0.2, 0.5), mask=mask)


def test_idm_train_names_a_bad_mask_weight_and_writes_nothing(tmp_path, capsys):
    data = write_images(tmp_path / "train", n=2)
    argv = ["train", "--task", "inpainting", "--ratio", "0.2:0.5", "--mask", "random:1,box:-2", "--unet", "tiny",
            "--steps", "1", "--crop", "16", "--iters", "1", "--device", "cpu", "--num-workers", "0", "--no-progress",
            "--data", str(data), "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    assert "the weight of 'box' must be a positive number, got '-2'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_mask_mixture_model_refuses_a_random_mask_ratio_outside_its_range(tmp_path, capsys):
    """A request that names only --ratio is for the model's default member (random masks): the box
    component, which has no ratio, must not make any ratio look served."""
    fam = tasks.get("inpainting").make_training_operator(16, seed=0, ratio=(0.2, 0.5), mask="random,box")
    folder = IDM(IDMConfig(unet="tiny", image_channels=3, steps=1)).save_pretrained(tmp_path / "mixture")
    (folder / "run.json").write_text(json.dumps({"format": "idm-train-run", "identity": {"task": "inpainting", "operator": fam.config()}}))
    defaults = tasks.get("inpainting").operator_kwargs()
    with pytest.raises(CheckpointError, match=r"operator ratio: trained with 0.2..0.5, requested 0.9"):
        load_trained(folder, expect_operator={"name": "inpainting", "ratio": 0.9}, operator_defaults=defaults)
    for inside in ({"ratio": 0.3}, {"mask": "box"}, {"mask": "box", "ratio": 0.9}, {}):
        load_trained(folder, expect_operator={"name": "inpainting", **inside}, operator_defaults=defaults)
    images = write_images(tmp_path / "images", n=1, size=16)
    argv = ["simulate", "--task", "inpainting", "--ratio", "0.9", "--input", str(images), "--checkpoint", str(folder),
            "--device", "cpu", "--out", str(tmp_path / "m.npz")]  # fmt: skip
    assert main(argv) == 2 and "trained with 0.2..0.5, requested 0.9" in capsys.readouterr().err


def test_bad_families_are_clear_errors():
    base = {"name": "cs", "img_size": [16, 16], "ratio": 0.1, "block": 8}
    with pytest.raises(OperatorInputError, match="low <= high"):
        Component(base, {"ratio": (0.5, 0.1)})
    with pytest.raises(OperatorInputError, match="at least one component"):
        OperatorFamily([])
    with pytest.raises(OperatorInputError, match="different shapes"):
        OperatorFamily([Component(base), Component({**base, "img_size": [8, 8]})])
    with pytest.raises(ValueError, match="does not use --mask"):
        tasks.get("cs").make_training_operator(32, mask="random,box")
    with pytest.raises(OperatorInputError, match=r"ratio must be in \(0, 1\], got 1.5"):  # at once, not at a later draw
        tasks.get("cs").make_training_operator(32, ratio=(0.5, 1.5))
    with pytest.raises(OperatorInputError, match=r"family component 'cs'.s settings: got an unexpected keyword "
                                                 r"argument 'ratoi' \(its settings: img_size, channels, ratio"):
        OperatorFamily([Component(base, {"ratoi": [0.1, 0.2]})])  # misspelt: named when the family is built
    family = OperatorFamily([Component(base, {"ratio": (0.05, 1.5)})])  # from Python: a range the operator refuses
    with pytest.raises(OperatorInputError, match=r"ratio must be in \(0, 1\], got 1.5"):
        family.check_draws()  # which idm.train.train calls before anything runs
    with pytest.raises(OperatorInputError, match=r"views must be a positive integer, got 0"):
        OperatorFamily([Component({"name": "ct", "img_size": [8, 8], "views": 4}, {"views": (0.0, 5.0)})]).check_draws()


def test_a_draw_of_the_prototypes_own_settings_is_the_prototype():
    """An operator without random parts is not rebuilt for a draw that changes none of its settings (a CT
    projector takes seconds to build at 256x256)."""
    family = OperatorFamily([Component({"name": "ct", "img_size": [16, 16], "views": 6}, {"views": [6]})])
    assert family.resample(0) is family.prototypes[0] and family.resample(1) is family.prototypes[0]
    assert family.prototypes[0].variant({**family.components[0].base, "views": 7}).views == 7


def test_train_on_a_ratio_range_then_reconstruct_any_ratio_inside(tmp_path, capsys):
    data = write_images(tmp_path / "train", n=3)
    out = tmp_path / "run"
    argv = [a for a in BASE if a not in ("0.25",)]
    argv[argv.index("--ratio") + 1 : argv.index("--ratio") + 1] = ["0.1:0.5"]
    assert main([*argv, "--data", str(data), "--iters", "1", "--out", str(out)]) == 0
    trained = load_trained(out, expect_task="cs", expect_operator={"name": "cs", "ratio": 0.3}, operator_defaults={"ratio": 0.1})
    assert trained.trained_on_family and trained.operator["ratio"] == 0.1 and trained.operator["block"] == 8
    # the task's defaults change what the family varies, where it covers them; the block it was trained with stays
    defaults = tasks.get("cs").operator_kwargs()  # ratio 0.1, block 32
    assert {k: load_trained(out, operator_defaults=defaults).operator[k] for k in ("ratio", "block")} == {"ratio": 0.1, "block": 8}
    assert load_trained(out, operator_defaults={"ratio": 0.05}).operator["ratio"] == pytest.approx(0.3)  # outside: the middle
    # idm simulate measures with the operator idm reconstruct uses for such a model
    assert main(["simulate", "--task", "cs", "--checkpoint", str(out), "--input", str(data), "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "m.npz")]) == 0  # fmt: skip
    from tasks.measurements import load_measurements

    assert load_measurements(tmp_path / "m.npz").items[0].operator["ratio"] == 0.1
    with pytest.raises(CheckpointError, match=r"trained with 0.1..0.5, requested 0.05"):
        load_trained(out, expect_operator={"ratio": 0.05})
    for ratio in ("0.2", "0.45"):
        dest = tmp_path / f"rec{ratio}"
        assert main(["reconstruct", "--task", "cs", "--ratio", ratio, "--block", "8", "--checkpoint", str(out),
                     "--input", str(data), "--device", "cpu", "--no-progress", "--out", str(dest)]) == 0  # fmt: skip
        assert json.loads((dest / "reconstruct.json").read_text())["operator"]["ratio"] == float(ratio)


def test_ratio_ranges_are_for_training_only(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["reconstruct", "--task", "cs", "--ratio", "0.1:0.5", "--input", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "invalid float value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*BASE[:3], "--ratio", "0.5:0.1", "--data", str(tmp_path), "--unet", "tiny", "--out", str(tmp_path / "o")])
    assert "LOW <= HIGH" in capsys.readouterr().err


def test_shipped_models_are_found_by_what_their_run_json_records(tmp_path, monkeypatch):
    from idm import shipped

    monkeypatch.setenv(shipped.MODELS_ENV, str(tmp_path / "models"))
    assert shipped.default_checkpoint("cs", {"name": "cs", "ratio": 0.1}) is None
    folder = tmp_path / "models" / "cs-any-ratio"
    IDM(IDMConfig(unet="tiny", image_channels=1, steps=1)).save_pretrained(folder)
    run = {"format": "idm-train-run", "identity": {"task": "cs", "operator": cs_family().config()}}
    (folder / "run.json").write_text(json.dumps(run))
    (tmp_path / "models" / "junk").mkdir()
    (tmp_path / "models" / "junk" / "run.json").write_text("{not json")  # skipped, not fatal
    assert shipped.default_checkpoint("cs", {"name": "cs", "ratio": 0.3, "block": 8}) == folder
    assert shipped.default_checkpoint("cs", {"name": "cs", "ratio": 0.6, "block": 8}) is None
    assert shipped.default_checkpoint("inpainting", {"name": "inpainting", "ratio": 0.3}) is None
    assert "cs-any-ratio (cs)" in shipped.missing_message("cs", {"name": "cs", "ratio": 0.6})
    assert shipped.model_path("cs-any-ratio") == folder  # a shipped model's name, e.g. for --init-from
    assert shipped.model_path(str(tmp_path)) == str(tmp_path) and shipped.model_path("nowhere") == "nowhere"
    assert load_trained("cs-any-ratio").path == folder  # every --checkpoint takes a shipped model's name
    # a model trained for exactly the requested ratio wins over the family, whatever the names' order
    exact = tmp_path / "models" / "zz-cs-10"
    IDM(IDMConfig(unet="tiny", image_channels=1, steps=1)).save_pretrained(exact)
    exact_op = operators.make("cs", img_size=(32, 32), channels=1, ratio=0.1, block=8).config()
    (exact / "run.json").write_text(json.dumps({"format": "idm-train-run", "identity": {"task": "cs", "operator": exact_op}}))
    assert shipped.default_checkpoint("cs", {"name": "cs", "ratio": 0.1, "block": 8}) == exact
    assert shipped.default_checkpoint("cs", {"name": "cs", "ratio": 0.3, "block": 8}) == folder
    with pytest.raises(CheckpointError, match="nor is it the name of a shipped model"):
        load_trained("nowhere")


def test_serving_share_is_the_weight_of_the_components_that_serve_a_request():
    inpainting = tasks.get("inpainting")
    mixed = inpainting.make_training_operator(16, seed=0, ratio=(0.2, 0.5), mask="random:1,box:2").config()
    random_only = inpainting.make_training_operator(16, seed=0, ratio=(0.2, 0.5), mask="random").config()
    plain = inpainting.make_operator(16, ratio=0.3, mask="random").config()
    random_request = {"name": "inpainting", "mask": "random", "ratio": 0.3}
    assert serving_share(mixed, random_request) == pytest.approx(1 / 3)
    assert serving_share(mixed, {"name": "inpainting", "mask": "box"}) == pytest.approx(2 / 3)
    assert serving_share(random_only, random_request) == serving_share(plain, random_request) == 1.0
    assert serving_share(random_only, {"name": "inpainting", "mask": "box"}) == 0.0
    assert serving_share(mixed, {"name": "inpainting", "mask": "random", "ratio": 0.8}) == 0.0  # outside the range
    assert serving_share(plain, {"name": "inpainting", "mask": "random", "ratio": 0.5}) == 0.0


def test_the_family_that_drew_a_kind_most_serves_it_whatever_the_names_order(tmp_path, monkeypatch):
    """A model of random masks alone serves random masks before a random-and-box model (named first); the box
    still goes to the mixed model, the only one that serves it."""
    from idm import shipped

    monkeypatch.setenv(shipped.MODELS_ENV, str(tmp_path / "models"))
    inpainting = tasks.get("inpainting")
    for name, mask in (("a-random-and-box", "random:1,box:2"), ("b-random", "random")):
        folder = tmp_path / "models" / name
        IDM(IDMConfig(unet="tiny", image_channels=1, steps=1)).save_pretrained(folder)
        family = inpainting.make_training_operator(16, seed=0, ratio=(0.15, 0.6), mask=mask)
        (folder / "run.json").write_text(json.dumps({"format": "idm-train-run",
                                                     "identity": {"task": "inpainting", "operator": family.config()}}))  # fmt: skip
    chosen = lambda **flags: shipped.find_shipped("inpainting", {"name": "inpainting", **flags}).name  # noqa: E731
    assert chosen(mask="random", ratio=0.5) == chosen(mask="random", ratio=0.2) == "b-random"
    assert chosen(mask="box") == "a-random-and-box"


def test_a_setting_no_operator_takes_is_a_mismatch_not_skipped():
    """A misspelt key (``ratoi``) is no setting the recorded variant lacks (``ratio`` of a box mask): every model
    would serve it, so it is named; the settings a variant lacks are still skipped."""
    cs = operators.make("cs", img_size=(16, 16), ratio=0.1, block=8).config()
    assert config_mismatches(cs, {"name": "cs", "ratoi": 0.3}) == [
        "operator ratoi: not a setting of the cs operator (its settings: block, channels, mode, phi_seed, ratio)"
    ]
    assert config_mismatches(cs, {"name": "cs", "ratio": 0.1, "seed": 3}) == []
    box = operators.make("inpainting", img_size=(16, 16), mask="box").config()
    assert config_mismatches(box, {"name": "inpainting", "mask": "box", "ratio": 0.5}) == []
    family = tasks.get("cs").make_training_operator((16, 16), ratio=(0.1, 0.5), block=8).config()
    assert "not a setting of the cs operator" in config_mismatches(family, {"name": "cs", "view": 18})[0]
    assert config_mismatches({"name": "family", "components": []}, {"name": "cs", "ratio": 0.1}) == [
        "operator: the recorded family is empty"
    ]
