"""Accelerated single-coil MRI: Cartesian k-space undersampling, 4x with 8 % fully sampled centre.

Data: magnitude images (PNG/TIFF folders, or MATLAB ``.mat`` files holding one
2-D matrix in [0, 1]) become complex images with a zero imaginary part,
stored as 2 channels (real, imaginary) -- the usual simulated-k-space
protocol. Fully sampled fastMRI single-coil ``.h5`` files give the complex
images of their real k-space instead (:class:`tasks.data.FastMRIImageDataset`).
A fresh random column mask is drawn every training iteration. PSNR is
measured on the magnitude image.
"""

import os

import torch
from torch.utils.data import Dataset

from tasks.base import Schedule, Task


class ComplexFromMagnitude(Dataset):
    """Wraps a dataset of ``(1, H, W)`` magnitude images: items ``(2, H, W)`` = (magnitude, 0)."""

    def __init__(self, magnitudes: Dataset):
        self.magnitudes = magnitudes

    def __len__(self) -> int:
        return len(self.magnitudes)

    def set_epoch(self, epoch: int) -> None:
        self.magnitudes.set_epoch(epoch)

    def number_streams(self, first: int) -> int:
        return self.magnitudes.number_streams(first)

    def item_name(self, index: int) -> str:
        return self.magnitudes.item_name(index)

    def item_source(self, index: int):
        return self.magnitudes.item_source(index)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = self.magnitudes[index]
        return torch.cat([x, torch.zeros_like(x)], dim=0)


def mri_loader(task, paths, crop, augment, seed):
    """Complex 2-channel items ``(2, H, W)``: magnitude images from image and/or ``.mat`` folders with a zero
    imaginary part, then the images of fully sampled fastMRI ``.h5`` files (files or folders of them)."""
    from tasks.data import ConcatSlices, FastMRIImageDataset, grayscale_dataset, holds_kspace_files

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    kspace = [p for p in paths if holds_kspace_files(p)]
    magnitudes = [p for p in paths if p not in kspace]
    parts = []
    if magnitudes or not kspace:  # no paths at all: grayscale_dataset's error
        parts.append(ComplexFromMagnitude(grayscale_dataset(magnitudes, color="gray", crop=crop, augment=augment, seed=seed)))
    if kspace:
        parts.append(FastMRIImageDataset(kspace, crop=crop, augment=augment, seed=seed))
    return parts[0] if len(parts) == 1 else ConcatSlices(parts)


TASK = Task(
    name="mri",
    operator="mri",
    operator_defaults={"acceleration": 4, "center_fraction": 0.08, "mask_type": "random"},
    options=("acceleration", "center_fraction"),
    channels=2,
    color="magnitude",
    crop=256,
    schedule=Schedule(iters=20_000, lr=1e-4, milestones=(0.2, 0.4, 0.6, 0.8), batch_size=8),
    loader=mri_loader,
    metric="magnitude",
    alpha_init=0.99,  # start at about the zero-filled image, not 7-9 dB below it (benchmarks/RESULTS.md, MRI)
    description="single-coil Cartesian MRI, 4x random column masks, magnitude images as complex (real, 0)",
)
