"""Inpainting: recover the missing pixels of natural colour images.

RGB images (``--color y`` or ``gray`` for one channel); random pixel masks
keeping half the pixels by default (a fresh mask every training iteration);
``--mask box`` or a mask image file for fixed masks. Training on
``--mask random,box`` mixes both kinds, boxes at random positions.
"""

from tasks.base import Schedule, Task

TASK = Task(
    name="inpainting",
    operator="inpainting",
    operator_defaults={"mask": "random", "ratio": 0.5},
    options=("mask", "ratio"),
    channels=3,
    color="rgb",
    crop=256,
    family_choices={"box_position": ("center", "random")},
    schedule=Schedule(iters=50_000, lr=1e-4, milestones=(0.2, 0.4, 0.6, 0.8), batch_size=8),
    separate_channels=True,  # the grey prior per colour channel: tiled over RGB it fills holes in grey (README)
    description="inpainting of natural RGB images, random masks keeping 50% of the pixels",
)
