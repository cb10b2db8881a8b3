"""The global batch of every iteration, as a pure function of ``(seed, iteration)``, and its shards.

Sample positions run through the data in epochs: the global batch of
iteration ``i`` (0-based) holds the positions ``i*B .. i*B + B - 1``;
position ``p`` is item ``perm_e[p % N]`` of epoch ``e = p // N``, where
``perm_e`` is a permutation of the ``N`` items drawn from ``(seed, e)``.
The item itself is read with the dataset's epoch set to ``e`` (so datasets
with seeded random crops, such as :mod:`tasks.data`'s, give a new crop every
epoch and the same crop on every re-read).

With ``K`` processes, rank ``r`` takes positions ``r*B/K .. (r+1)*B/K - 1``
of the global batch (``B`` must be a multiple of ``K``): equal shards, so
DDP's gradient average over ranks equals the gradient of the mean loss over
the whole global batch, exactly as a single process computes it.

One of the 8 flips/rotations (dihedral group) is drawn per *global* batch
from ``(seed, iteration)`` and applied to every shard.

Several image sizes (``more_datasets``: the same items cropped to other
sizes) take turns: iteration ``i`` reads its positions from dataset
``i % K``, so every item is still seen once per epoch, at one of the sizes.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from idm.training import seeds
from idm.training.image_noise import check_noise_level, draw_image_noise
from idm.training.phase import check_phase_fraction, random_phase_maps, with_phase
from operators.dihedral import Dihedral


def flip_rotation(seed: int, iteration: int, square: bool = True) -> int:
    """The dihedral element ``k`` (:meth:`operators.dihedral.Dihedral.from_index`) used for the whole global
    batch of ``iteration``.

    Non-square batches only use the 4 shape-preserving elements (0, 2, 4, 6).
    """
    choices = tuple(range(8)) if square else (0, 2, 4, 6)
    g = seeds.generator(seed, seeds.AUGMENT, iteration)
    return choices[int(torch.randint(len(choices), (1,), generator=g))]


def worker_init(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: workers ignore Ctrl-C / SIGTERM, which the main process
    handles (it finishes the iteration, checkpoints, then shuts the workers down)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _check_same_items(dataset: Dataset, more_datasets: Sequence[Dataset]) -> None:
    """Several image sizes must crop the same items in the same order (item ``i`` one image at every size):
    the same count and, where the datasets name their items' files (``item_source``), the same files."""
    sizes = (dataset, *more_datasets)
    counts = [str(len(d)) for d in sizes]
    problem = f"the sizes keep {', '.join(counts[:-1])} and {counts[-1]} of them" if len(set(counts)) > 1 else None
    if problem is None and all(callable(getattr(d, "item_source", None)) for d in sizes):
        for other in more_datasets:
            index = next((i for i in range(len(dataset)) if dataset.item_source(i) != other.item_source(i)), None)
            if index is not None:
                problem = f"item {index} is {dataset.item_source(index)[0]} at one size, {other.item_source(index)[0]} at another"
                break
    if problem is not None:
        raise ValueError(f"the training images at each crop size must be the same images, but {problem} (an image "
                         "smaller than a crop is left out of that size): choose crops that every image holds")


class ShardedBatches(Dataset):
    """Map-style dataset whose item ``i`` is this rank's shard of the global batch of iteration ``i``.

    Feed it to a ``DataLoader(batch_size=None, sampler=range(start, stop))``;
    workers may prefetch, and every item is deterministic.

    Args:
        dataset: items ``(C, H, W)`` float tensors (all the same shape, e.g. crops).
        global_batch: ``B``, the batch of one iteration over all processes.
        seed: run seed.
        rank, world_size: this process's slice (``B % world_size == 0``).
        augment: apply one random flip/rotation per global batch.
        random_phase: the fraction of images, in ``[0, 1]``, whose complex ``(2, H, W)`` values are
            multiplied by a random smooth phase (:mod:`idm.training.phase`), drawn per iteration for the
            whole global batch (each image is chosen with this probability; ``0``: none, ``1``: all).
        image_noise: the largest standard deviation of the Gaussian noise added to each image (its own,
            uniform in ``[0, image_noise]``; :mod:`idm.training.image_noise`), after the phase; ``0``: none.
        more_datasets: the same items at other image sizes, as many as ``dataset`` holds; iteration ``i`` reads
            from ``(dataset, *more_datasets)[i % K]``.

    Items: float32 ``(B / world_size, C, H, W)``, ``(H, W)`` that of iteration ``i``'s dataset.
    """

    def __init__(
        self,
        dataset: Dataset,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        random_phase: float = 0.0,
        image_noise: float = 0.0,
        more_datasets: Sequence[Dataset] = (),
    ):
        n = len(dataset)
        if n == 0:
            raise ValueError("the training dataset is empty")
        _check_same_items(dataset, more_datasets)
        if global_batch < 1:
            raise ValueError(f"batch size must be >= 1, got {global_batch}")
        if global_batch % world_size:
            raise ValueError(
                f"the global batch size {global_batch} is not a multiple of the {world_size} processes; "
                "every process must get an equal share"
            )
        self.datasets = (dataset, *more_datasets)
        self.n = n
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.augment = augment
        self.random_phase = check_phase_fraction(random_phase)
        self.image_noise = check_noise_level(image_noise)
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:  # iterations are unbounded; the sampler chooses them
        return 2**62

    def _permutation(self, epoch: int) -> list[int]:
        perm = self._perms.get(epoch)
        if perm is None:
            g = seeds.generator(self.seed, seeds.DATA_ORDER, epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def positions(self, iteration: int) -> list[tuple[int, int]]:
        """``(epoch, item index)`` of every sample of this rank's shard at ``iteration``."""
        start = iteration * self.global_batch + self.rank * self.local_batch
        out = []
        for p in range(start, start + self.local_batch):
            epoch, offset = divmod(p, self.n)
            out.append((epoch, self._permutation(epoch)[offset]))
        return out

    def __getitem__(self, iteration: int) -> torch.Tensor:
        items = []
        dataset = self.datasets[int(iteration) % len(self.datasets)]
        set_epoch = getattr(dataset, "set_epoch", None)
        for epoch, index in self.positions(int(iteration)):
            if callable(set_epoch):
                set_epoch(epoch)
            items.append(torch.as_tensor(dataset[index], dtype=torch.float32))
        try:
            batch = torch.stack(items)
        except RuntimeError as err:
            shapes = sorted({tuple(t.shape) for t in items})
            raise ValueError(f"training items differ in shape {shapes}; use a crop size: {err}") from None
        if self.augment:
            k = flip_rotation(self.seed, int(iteration), batch.shape[-1] == batch.shape[-2])
            batch = Dihedral.from_index(k).apply(batch)
        if self.random_phase:
            g = seeds.generator(self.seed, seeds.PHASE, int(iteration))
            maps = random_phase_maps(self.global_batch, batch.shape[-2], batch.shape[-1], g)
            if self.random_phase < 1:  # the maps are drawn first, so a fraction of 1 keeps the maps of runs before it
                maps = maps * (torch.rand(self.global_batch, 1, 1, generator=g) < self.random_phase)
            batch = with_phase(batch, seeds.rows_of_rank(maps, self.rank, self.world_size))
        if self.image_noise:  # drawn for the global batch, so every rank's share is the same as in one process
            g = seeds.generator(self.seed, seeds.IMAGE_NOISE, int(iteration))
            noise = draw_image_noise((self.global_batch, *batch.shape[1:]), self.image_noise, g)
            batch = batch + seeds.rows_of_rank(noise, self.rank, self.world_size)
        return batch.contiguous()


def iteration_loader(
    batches: ShardedBatches, start: int, stop: int, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """The batches of iterations ``start .. stop - 1`` in order (none when ``stop <= start``).

    Items as :class:`ShardedBatches`; ``num_workers`` processes prefetch them
    and ignore Ctrl-C / SIGTERM (:func:`worker_init`). The loader has a
    generator of its own: a DataLoader without one draws its workers' base
    seed from the global RNG each time it is iterated, which a resumed run
    does right after restoring that RNG, so everything drawn from it later
    (a prior's dropout with ``--no-recompute``) would differ from the
    uninterrupted run's. Every item is seeded by its iteration anyway.
    """
    return DataLoader(
        batches,
        batch_size=None,
        sampler=range(start, max(start, stop)),
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(0),
    )


@contextlib.contextmanager
def loader_batches(loader: Iterable[torch.Tensor]) -> Iterator[Iterator[torch.Tensor]]:
    """``iter(loader)``, whose worker processes (a DataLoader's) are stopped on the way out, after an error too.

    The workers ignore SIGTERM (:func:`worker_init`), which is how Python's exit would stop them, so
    an error that left them running (a file that fails to decode mid-run) would hang the process.
    A worker's error comes out with its own message, without the worker's traceback text.
    """
    batches = iter(loader)

    def relayed() -> Iterator[torch.Tensor]:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except ValueError as err:  # DataError and other bad-input errors, re-raised from a worker
                message = _worker_error_message(str(err))
                if message == str(err):
                    raise
                try:
                    relay = type(err)(message)
                except Exception:  # noqa: BLE001 -- an error class that takes other arguments: as it came
                    raise err from None
                raise relay from None
            yield batch

    try:
        yield relayed()
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()


def _worker_error_message(text: str) -> str:
    """The original message of an error a DataLoader worker raised (its last traceback line, without the
    exception's name); ``text`` itself for an error of the main process."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last
