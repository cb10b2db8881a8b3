"""Machinery shared by ``idm.train`` (IDM fine-tuning) and ``idm.pretrain`` (diffusion priors).

One concept per module:

* :mod:`~idm.training.seeds` -- every random draw of a run derived from ``(seed, stream, iteration, ...)``;
* :mod:`~idm.training.batches` -- the deterministic global batch of iteration ``i`` and its per-rank shard;
* :mod:`~idm.training.distributed` -- torchrun detection, process groups, collective helpers;
* :mod:`~idm.training.run_folder` -- the ``--out`` folder: run config, resume checks, checkpoints;
* :mod:`~idm.training.state` -- optimizer and RNG state as safetensors + JSON (never pickle);
* :mod:`~idm.training.csv_log` -- the ``log.csv`` file;
* :mod:`~idm.training.lr` -- the step learning-rate schedule (stateless);
* :mod:`~idm.training.loop` -- the iteration loop: time budget, cadence, progress bar, clean stop;
* :mod:`~idm.training.trained` -- loading a trained IDM (run folder or checkpoint) with its task metadata.

Nothing here imports ``tasks`` or ``benchmarks``.
"""
