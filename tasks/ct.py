"""Sparse-view CT: parallel-beam Radon transform at 60 angles over 180 degrees.

Data: CT slices from ``.npy`` (Hounsfield units), DICOM or multi-page TIFF
files, windowed to [0, 1] by ``tasks.data.CTSliceDataset`` (default window
[-1024, 3071] HU). The operator has no random part (the views are fixed).
CT data are scarce: pretrain the prior on grayscale natural images, then
fine-tune here.
"""

from tasks.base import Schedule, Task


def ct_loader(task, paths, crop, augment, seed):
    """``CTSliceDataset``: every 2-D slice of every file is one item ``(1, H, W)`` in [0, 1]."""
    from tasks.data import CTSliceDataset

    return CTSliceDataset(paths, crop=crop, augment=augment, seed=seed)


TASK = Task(
    name="ct",
    operator="ct",
    operator_defaults={"views": 60},
    options=("views",),
    channels=1,
    color="hu",
    crop=256,
    schedule=Schedule(iters=20_000, lr=1e-4, milestones=(0.2, 0.4, 0.6, 0.8), batch_size=8),
    randomized=False,
    loader=ct_loader,
    size_bound=True,
    pinv_mapping="images",  # FBP of the constant image's sinogram is streaks: map A^+ y, not y
    final_projection=True,  # least-squares fit to y after the last step: +0.9 dB / +0.036 SSIM for ct-18 (benchmarks/RESULTS.md, CT)
    alpha_init=0.99,  # start at about the FBP: untrained, 35.6 dB on a clinical slice, 14.1 with 0.5 (benchmarks.ct_start)
    description="sparse-view parallel-beam CT, 60 views, windowed slices (.npy / .dcm / .tif)",
)
