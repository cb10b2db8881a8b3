"""``idm train --image-noise``: Gaussian noise on the training images (targets included), seeded per iteration."""

import json

import pytest
import torch

from idm.cli import main
from idm.training import seeds
from idm.training.batches import ShardedBatches
from idm.training.image_noise import check_noise_level, draw_image_noise
from tests.conftest import picture_folder


def test_each_image_gets_its_own_deviation_within_the_level_and_the_draw_is_seeded():
    noise = draw_image_noise((64, 2, 32, 32), 0.05, torch.Generator().manual_seed(0))
    assert noise.shape == (64, 2, 32, 32) and noise.dtype == torch.float32
    assert torch.equal(noise, draw_image_noise((64, 2, 32, 32), 0.05, torch.Generator().manual_seed(0)))
    assert not torch.equal(noise, draw_image_noise((64, 2, 32, 32), 0.05, torch.Generator().manual_seed(1)))
    stds = noise.std(dim=(1, 2, 3))
    assert float(stds.max()) < 0.05 * 1.1  # 2048 samples per image: the estimate is within a few %
    assert float(stds.min()) < 0.01 and float(stds.max()) > 0.04  # uniform in [0, 0.05]: clean and noisy images
    means = noise.mean(dim=(1, 2, 3))
    assert float(means.abs().max()) < 0.01  # zero-mean noise
    assert torch.equal(draw_image_noise((64, 2, 32, 32), 0.0, torch.Generator().manual_seed(0)), torch.zeros(64, 2, 32, 32))
    with pytest.raises(ValueError, match=r"a batch of images \(B, C, H, W\)"):
        draw_image_noise((2, 32, 32), 0.05, torch.Generator())


@pytest.mark.parametrize("bad", [-0.01, 1.0, float("nan"), float("inf"), "loud"])
def test_noise_levels_outside_zero_to_one_are_refused(bad):
    with pytest.raises(ValueError, match=r"image_noise must be a standard deviation in \[0, 1\)"):
        check_noise_level(bad)


def test_noisy_batches_are_the_same_for_every_rank_split_and_add_the_seeded_draw_after_the_phase():
    items = [torch.stack((torch.full((8, 8), float(i + 1)), torch.zeros(8, 8))) for i in range(4)]
    phased = ShardedBatches(items, 4, seed=2, augment=False, random_phase=0.5)
    whole = ShardedBatches(items, 4, seed=2, augment=False, random_phase=0.5, image_noise=0.1)
    halves = [ShardedBatches(items, 4, seed=2, rank=r, world_size=2, augment=False, random_phase=0.5, image_noise=0.1)
              for r in (0, 1)]  # fmt: skip
    for it in range(3):
        batch = whole[it]
        torch.testing.assert_close(torch.cat([h[it] for h in halves]), batch)
        expected = draw_image_noise((4, 2, 8, 8), 0.1, seeds.generator(2, seeds.IMAGE_NOISE, it))
        torch.testing.assert_close(batch - phased[it], expected)
        assert float((batch - phased[it]).abs().max()) > 0
    torch.testing.assert_close(ShardedBatches(items, 4, seed=2, augment=False, image_noise=0.0)[1],
                               ShardedBatches(items, 4, seed=2, augment=False)[1])  # fmt: skip


def test_train_records_the_noise_level_and_refuses_an_impossible_one(tmp_path, capsys):
    pictures = picture_folder(tmp_path, 24)
    base = ["train", "--task", "mri", "--data", str(pictures), "--unet", "tiny", "--steps", "1", "--crop", "16",
            "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--no-progress", "--iters", "1"]  # fmt: skip
    assert main([*base, "--image-noise", "0.02", "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "checkpoints" / "iter_0000001" / "run.json").read_text())
    assert run["identity"]["training"]["image_noise"] == 0.02
    assert main([*base, "--out", str(tmp_path / "clean")]) == 0
    clean = json.loads((tmp_path / "clean" / "checkpoints" / "iter_0000001" / "run.json").read_text())
    assert "image_noise" not in clean["identity"]["training"]  # off: runs from before the option still resume
    assert main([*base, "--image-noise", "2", "--out", str(tmp_path / "loud")]) == 2
    assert "image_noise must be a standard deviation in [0, 1), got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "loud").exists()
