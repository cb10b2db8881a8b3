"""Accelerated single-coil MRI: Cartesian k-space undersampling, 4x with 8 % fully sampled centre.

Data: magnitude images (PNG/TIFF folders, or MATLAB ``.mat`` files holding one
2-D matrix in [0, 1]) become complex images with a zero imaginary part,
stored as 2 channels (real, imaginary) -- the usual simulated-k-space
protocol. A fresh random column mask is drawn every training iteration.
PSNR is measured on the magnitude image.
"""

from pathlib import Path

import torch
from torch.utils.data import Dataset

from tasks.base import Schedule, Task


class ComplexFromMagnitude(Dataset):
    """Wraps a dataset of ``(1, H, W)`` magnitude images: items ``(2, H, W)`` = (magnitude, 0)."""

    def __init__(self, parts: list[Dataset]):
        self.parts = parts
        self.offsets = []
        total = 0
        for part in parts:
            self.offsets.append(total)
            total += len(part)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.total:
            raise IndexError(f"index {index} out of range for {self.total} items")
        k = max(i for i, off in enumerate(self.offsets) if off <= index)
        return k, index - self.offsets[k]

    def item_name(self, index: int) -> str:
        k, i = self._locate(index)
        return self.parts[k].item_name(i)

    def __getitem__(self, index: int) -> torch.Tensor:
        k, i = self._locate(index)
        x = self.parts[k][i]
        return torch.cat([x, torch.zeros_like(x)], dim=0)


def _has_mat(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".mat"
    return path.is_dir() and any(p.suffix.lower() == ".mat" for p in path.iterdir() if p.is_file())


def mri_loader(task, paths, crop, augment, seed):
    """Magnitude images from image folders and/or ``.mat`` folders -> complex 2-channel items."""
    from tasks.data import ImageFolderDataset, MatFolderDataset

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    mats = [p for p in paths if _has_mat(Path(p))]
    images = [p for p in paths if p not in mats]
    parts = []
    if mats:
        parts.append(MatFolderDataset(mats, crop=crop, augment=augment, seed=seed))
    if images:
        parts.append(ImageFolderDataset(images, color="gray", crop=crop, augment=augment, seed=seed))
    if not parts:
        from tasks.data import DataError

        raise DataError("no MRI data paths given")
    return ComplexFromMagnitude(parts)


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
    description="single-coil Cartesian MRI, 4x random column masks, magnitude images as complex (real, 0)",
)
