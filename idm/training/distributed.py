"""Multi-process training with PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun --nproc_per_node=K -m idm train ...`` starts K copies of the
command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous
address) in the environment; :func:`detect` reads them and :func:`setup`
joins the process group: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``),
Gloo on the CPU. Without those variables everything runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when running under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and shows the progress bar."""
        return self.rank == 0


def detect() -> DistEnv:
    """The :class:`DistEnv` described by torchrun's environment variables (single process otherwise)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise ValueError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {err}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"malformed torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def setup(env: DistEnv, device: torch.device) -> torch.device:
    """Join the process group (if ``env.enabled``) and return this process's device.

    On CUDA each process uses ``cuda:LOCAL_RANK`` (whatever index ``device``
    names) and NCCL; on the CPU Gloo.
    """
    if not env.enabled:
        return device
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training supports cuda and cpu devices, not {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return device


def teardown(env: DistEnv, clean: bool = True) -> None:
    """Leave the process group; ``clean``: after a final barrier, so no rank exits while others still talk.

    After an error (``clean=False``) there is no barrier: the other ranks may
    be waiting in a collective that will never complete, and torchrun stops
    them when this process exits.
    """
    if env.enabled and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


class PeerLostError(ConnectionError):
    """A collective operation failed because another process of the run has stopped (killed, out of memory)."""


def named_peer_loss(err: BaseException, env: DistEnv) -> BaseException:
    """``err``, or for a multi-process run whose collective failed because another process is gone a
    :class:`PeerLostError` that says so in one line, instead of a traceback through the backward pass. Only
    broken connections count: torch's ``DistNetworkError``, Gloo's transport errors, which it raises as plain
    ``RuntimeError`` naming its ``gloo/transport`` source, and NCCL's ``ncclRemoteError`` (a remote process
    exited); any other error keeps its traceback."""
    if not env.enabled or not isinstance(err, RuntimeError):
        return err
    nccl_peer_gone = isinstance(err, dist.DistBackendError) and ("ncclRemoteError" in str(err) or "remote process" in str(err))
    if not isinstance(err, dist.DistNetworkError) and "gloo/transport" not in str(err) and not nccl_peer_gone:
        return err
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PeerLostError(f"process {env.rank} of {env.world_size}: another process of this run stopped, so this one "
                         f"stops too ({first[:200]}); the last checkpoint is intact: rerun with --resume")  # fmt: skip


def end(env: DistEnv, release: Callable[[], None], error: BaseException | None = None) -> BaseException | None:
    """End a run's process: leave the process group (after ``error``, without the final barrier) and call
    ``release`` (the run folder's lock) whatever fails; returns the error to raise, ``error`` or the
    :class:`PeerLostError` that names it (:func:`named_peer_loss`)."""
    try:
        teardown(env, clean=error is None)
    finally:
        release()
    return None if error is None else named_peer_loss(error, env)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """Element-wise sum of a short list of floats over all ranks (the list itself when single-process)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (keeps "stop now" identical everywhere)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() > 0)


def wrap_ddp(module: torch.nn.Module, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when distributed, ``module`` itself otherwise.

    ``static_graph=True`` (as the IDM authors do): the set of parameters that
    get gradients is the same every iteration, and IDM's memory-saving
    backward delivers all parameter gradients at once from one custom
    autograd function (gradients summed by ``torch.autograd.backward(...,
    inputs=...)`` calls inside its backward); a static graph lets the reducer handle
    parameters whose gradients stay ``None`` (e.g. unused ones) without
    ``find_unused_parameters``' extra traversal. DDP broadcasts rank 0's
    parameters and buffers at construction, so every rank starts identical.
    """
    if not env.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, static_graph=True)


def average_gradients(module: torch.nn.Module, env: DistEnv) -> None:
    """Replace every parameter's ``.grad`` by its mean over the processes (nothing when single-process).

    What DistributedDataParallel's hooks do during a backward, done once after
    several backwards of the unwrapped module (gradient accumulation,
    :mod:`idm.training.micro_batches`). The gradients travel as one flat
    buffer. Parameters without a gradient keep none (Adam then skips them):
    the same network runs on every process, so they are the same ones everywhere.
    """
    if not env.enabled:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= env.world_size
    for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(piece.view_as(grad))
