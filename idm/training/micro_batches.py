"""Gradient accumulation: one training step's batch run as several smaller micro-batches.

A step's loss is a mean over its images (the L1 loss, the SSIM term and
their log form all are: :class:`idm.training.losses.ReconstructionLoss`;
``idm pretrain``'s noise MSE too). Split the ``B`` images into pieces of at
most ``m`` and weight the loss of a piece of ``b`` images by ``b / B``: the
gradients summed over the pieces are those of the whole batch, up to the
order of floating-point sums (every layer of the network treats images
independently: GroupNorm, not BatchNorm). The step draws its operator,
noise and augmentation for the whole batch first, so the update is the same
one; what changes is the memory: the activations held at once (the wired
states of the memory-saving backward, or every activation with
``--no-recompute``) are those of ``m`` images, not ``B``. A device that
cannot hold the batch trains with it all the same, in more, smaller passes.

It does not make training faster: on the 2-core Zen 5 EPYC a step of four
256x256 images took from 5 % less to 12 % more time in pieces of one or
two than at once (``python -m benchmarks.speed --train-micro-batch 4 2 1``,
README *A batch that does not fit in memory*).

Under ``torchrun`` the pieces run on the unwrapped model, without
``DistributedDataParallel``'s hooks, and the gradients are averaged over
the processes once, after the last piece (:func:`idm.training.distributed.average_gradients`):
DDP's own accumulation (``no_sync``) does not work with the ``static_graph``
this toolkit wraps its models with (torch 2.14.1 stops at an internal assert
of its reducer, ``expect_autograd_hooks_``: pytorch/pytorch pull request 187732).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

__all__ = ["backward_in_micro_batches", "check_micro_batch", "micro_batch_slices"]


def check_micro_batch(micro_batch: int | None) -> int | None:
    """``micro_batch`` if it is ``None`` (the whole batch at once) or an integer >= 1; ``ValueError`` otherwise."""
    if micro_batch is None:
        return None
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a whole number of images >= 1 (or None: the whole batch), got {micro_batch!r}")
    return micro_batch


def micro_batch_slices(batch: int, micro_batch: int | None) -> list[slice]:
    """The rows of each micro-batch of a batch of ``batch`` images: pieces of ``micro_batch`` images and a
    smaller last one; one slice of the whole batch when ``micro_batch`` is ``None`` or at least ``batch``."""
    size = batch if micro_batch is None else min(check_micro_batch(micro_batch), batch)
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def backward_in_micro_batches(loss_of: Callable[[slice], Tensor], batch: int, micro_batch: int | None) -> Tensor:
    """Backpropagate the mean loss of a batch of ``batch`` images one micro-batch at a time.

    Args:
        loss_of: ``loss_of(rows)`` runs the network on the images ``rows`` of
            the batch and returns their mean loss (a scalar tensor).
        batch: the number of images.
        micro_batch: at most this many images per forward and backward
            (:func:`micro_batch_slices`).

    Returns:
        The whole batch's mean loss, detached. The gradients are accumulated
        into the parameters' ``.grad`` (clear them before, step after).

    Raises:
        ValueError: what ``loss_of`` raised, and with several pieces a note
        that the measurements are cut into pieces, not the physics (a deepinv
        physics that holds one mask or kernel per image then does not match).
    """
    pieces = micro_batch_slices(batch, micro_batch)
    total = None
    for rows in pieces:
        share = (rows.stop - rows.start) / batch
        try:
            loss = loss_of(rows) * share
        except ValueError as err:
            if len(pieces) == 1:
                raise
            raise ValueError(f"{err} (with micro_batch={micro_batch}: each piece of the batch gets its rows of the "
                             "measurements but the whole physics, so a physics with one mask or kernel per image "
                             "needs the whole batch at once: no micro_batch)") from err  # fmt: skip
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total
