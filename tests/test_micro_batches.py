"""Gradient accumulation (``--micro-batch``): the same update as the whole batch at once, in ``idm train`` and
``idm pretrain``, single-process and under torchrun (that case lives beside the DDP test in ``test_train.py``)."""

from __future__ import annotations

import json

import pytest
import torch

import operators
from idm import IDMConfig
from idm.cli import main
from idm.training.losses import ReconstructionLoss
from idm.training.micro_batches import backward_in_micro_batches, check_micro_batch, micro_batch_slices
from idm.training.options import LoopOptions
from tests.conftest import perturbed_model, relative_error
from tests.test_pretrain import BASE as PRETRAIN
from tests.test_train import BASE as TRAIN
from idm.train import load_trained
from tests.test_train import read_log, weights, write_images


def test_a_batch_is_cut_into_pieces_of_the_micro_batch_and_a_smaller_last_one():
    assert micro_batch_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert micro_batch_slices(4, 1) == [slice(i, i + 1) for i in range(4)]
    assert micro_batch_slices(4, None) == micro_batch_slices(4, 4) == micro_batch_slices(4, 9) == [slice(0, 4)]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="micro_batch must be a whole number of images >= 1"):
            check_micro_batch(bad)
    with pytest.raises(ValueError, match="LoopOptions: micro_batch must be"):
        LoopOptions(micro_batch=0)


@pytest.mark.parametrize("loss_fn", [ReconstructionLoss(), ReconstructionLoss(ssim_weight=0.5, log_form=True)],
                         ids=["l1", "log-l1-ssim"])  # fmt: skip
def test_micro_batches_give_the_whole_batchs_gradients(loss_fn):
    op = operators.make("cs", img_size=(16, 16), ratio=0.3, block=8, mode="permuted", seed=1)
    model = perturbed_model(IDMConfig(unet="tiny", steps=2, invertible="both", recompute=True, final_projection=True))
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = op.A(x)

    def gradients(micro_batch):
        model.zero_grad(set_to_none=True)
        loss = backward_in_micro_batches(lambda rows: loss_fn(model(y[rows], op), x[rows]), 5, micro_batch)
        return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    whole_loss, whole = gradients(None)
    assert len(whole) == len(list(model.parameters()))
    scale = torch.cat([g.flatten() for g in whole.values()]).abs().max().item()  # key biases' gradients are ~1e-17
    for micro_batch in (1, 2, 3):
        loss, pieces = gradients(micro_batch)
        assert abs(float(loss - whole_loss)) < 1e-13 * abs(float(whole_loss))
        assert max(relative_error(pieces[name], whole[name], floor=1e-6 * scale) for name in whole) < 1e-10
    model.zero_grad(set_to_none=True)  # the gradient of a piece alone is not the batch's: the check can fail
    loss_fn(model(y[:1], op), x[:1]).backward()
    assert max(relative_error(p.grad, whole[name], floor=1e-6 * scale) for name, p in model.named_parameters()) > 1e-3


def test_a_physics_with_one_mask_per_image_is_named_when_cut_into_micro_batches():
    from deepinv.physics import Inpainting

    masks = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    physics = Inpainting(img_size=(1, 16, 16), mask=masks)  # one mask per image of a batch of 2
    model = perturbed_model(IDMConfig(unet="tiny", steps=1))
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    y = physics.A(x)
    loss_of = lambda rows: ReconstructionLoss()(model(y[rows], physics), x[rows])  # noqa: E731
    assert torch.isfinite(backward_in_micro_batches(loss_of, 2, None))  # the whole batch: fine
    with pytest.raises(ValueError, match=r"with micro_batch=1: each piece.*needs the whole batch at once"):
        backward_in_micro_batches(loss_of, 2, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "train", n=6, size=20)


def test_idm_train_with_micro_batches_makes_the_same_model_and_a_resume_may_change_them(tmp_path, data):
    common = [*TRAIN, "--data", str(data), "--batch-size", "3", "--ssim-weight", "0.5", "--checkpoint-every", "2",
              "--lr-milestones", "100"]  # fmt: skip
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert main([*common, "--iters", "4", "--out", str(whole)]) == 0
    assert main([*common, "--iters", "2", "--micro-batch", "2", "--out", str(pieces)]) == 0
    assert main([*common, "--iters", "4", "--micro-batch", "1", "--out", str(pieces), "--resume"]) == 0
    models = [load_trained(run).model.eval() for run in (whole, pieces)]
    op = operators.make("cs", img_size=(16, 16), ratio=0.25, block=8, mode="permuted", seed=2)
    y = op.A(torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():  # the same function (weights that no gradient reaches, e.g. a bias before a
        outputs = [model(y, op) for model in models]  # GroupNorm of one channel a group, may differ: Adam
    assert relative_error(outputs[1], outputs[0]) < 1e-5  # makes steps of the lr's size from their rounding)
    assert max(abs(float(r["loss"]) - float(s["loss"])) for r, s in zip(read_log(whole), read_log(pieces))) <= 1e-6
    run = json.loads((pieces / "checkpoints" / "iter_0000004" / "run.json").read_text())
    assert run["settings"]["micro_batch"] == 1  # a setting of the chunk, not part of the run's identity
    assert "micro_batch" not in json.dumps(run["identity"])


def test_idm_pretrain_with_micro_batches_makes_the_same_prior(tmp_path, data, capsys):
    common = [*PRETRAIN, "--data", str(data), "--batch-size", "3", "--iters", "3", "--checkpoint-every", "3"]
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert main([*common, "--out", str(whole)]) == 0
    assert main([*common, "--micro-batch", "2", "--out", str(pieces)]) == 0
    from diffusers import UNet2DModel

    unets = [UNet2DModel.from_pretrained(run / "prior").eval() for run in (whole, pieces)]
    noisy = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same function (see the idm train test above)
        outputs = [unet(noisy, torch.tensor([10, 500])).sample for unet in unets]
    assert relative_error(outputs[1], outputs[0]) < 1e-5
    with pytest.raises(SystemExit):
        main([*common, "--micro-batch", "0", "--out", str(tmp_path / "bad")])
    assert "--micro-batch" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_speed_benchmark_times_training_in_micro_batches(tmp_path, capsys):
    import csv

    from benchmarks import speed

    out = tmp_path / "speed"
    assert speed.main(["--device", "cpu", "--unet", "tiny", "--size", "32", "--batch", "1", "--train-batch", "2",
                       "--train-micro-batch", "8", "1", "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0  # fmt: skip
    train = [r for r in csv.DictReader(open(out / "speed.csv")) if r["mode"] == "train"]
    assert [(r["variant"], r["batch"], r["micro_batch"]) for r in train] == [  # 8 runs the batch of 2 at once
        ("none", "2", "2"), ("none", "2", "1"), ("both", "2", "2"), ("both", "2", "1")]  # fmt: skip
    assert all(r["status"] == "ok" and float(r["s_per_iter"]) > 0 for r in train)
    by_variant = {}
    for r in train:  # the same work, cut differently
        by_variant.setdefault(r["variant"], set()).add(r["gflop_per_image"])
    assert all(len(counts) == 1 for counts in by_variant.values())
    with pytest.raises(SystemExit):
        speed.main(["--device", "cpu", "--unet", "tiny", "--train-micro-batch", "1", "--out", str(out)])
    assert "give --train-batch too" in capsys.readouterr().err
