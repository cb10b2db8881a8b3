"""The uniform average of the weights of a training run's last checkpoints (``idm export --average-from``).

    from idm.training.averaging import checkpoints_from, average_weights
    chosen = checkpoints_from("runs/cs10", 500)            # [(500, Path(...)), (525, ...), ...]
    tensors = average_weights([folder for _, folder in chosen])

At a constant learning rate the checkpoints of one run scatter around the
level the run has reached; the mean of their weights (stochastic weight
averaging, Izmailov et al. 2018) tends to sit near the centre of that
scatter or above it. Unlike ``idm train --ema-decay`` it needs no decision
before the run: any kept checkpoints of a finished run can be averaged. The
IDM has no batch statistics (its U-Net normalises with GroupNorm), so the
averaged weights are a complete model as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from idm.checkpoint import CheckpointError, check_weights_fit, load_json, load_tensors
from idm.model import CONFIG_NAME, WEIGHTS_NAME, check_config_matches_weights
from idm.training.run_folder import RunFolder
from idm.training.trained import RUN_FORMAT, is_model_dir


def checkpoints_from(run_folder: str | os.PathLike, from_iteration: int) -> list[tuple[int, Path]]:
    """The checkpoints ``(iteration, folder)`` of an ``idm train`` ``--out`` folder at ``from_iteration`` or later,
    oldest first: at least two, or a :class:`CheckpointError` that names what the folder holds."""
    folder = Path(run_folder)
    run = RunFolder(folder, RUN_FORMAT)
    if from_iteration < 0:
        raise CheckpointError(f"--average-from {from_iteration}: an iteration is 0 or more")
    if not run.checkpoints_dir.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a training --out folder (no checkpoints/): --average-from "
                              "averages the checkpoints of one run")  # fmt: skip
    kept = run.checkpoints()
    chosen = [(iteration, path) for iteration, path in kept if iteration >= from_iteration]
    if len(chosen) < 2:
        held = ", ".join(str(iteration) for iteration, _ in kept) or "none"
        raise CheckpointError(f"--average-from {from_iteration} leaves {len(chosen)} checkpoint(s) of {str(folder)!r} "
                              f"to average (it keeps iterations {held}): an average needs at least two")  # fmt: skip
    return chosen


def average_weights(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The elementwise mean of the ``model.safetensors`` of ``folders`` (IDM model folders of one network).

    Floating tensors are summed in float64 and returned in their stored dtype; other tensors must be equal in
    every folder and are returned as they are. Raises :class:`CheckpointError` when a folder is not a model
    folder, when the folders hold different networks (another ``config.json``, other tensor names, shapes or
    dtypes, or integer tensors that differ) or when a weight is not finite.
    """
    if not folders:
        raise CheckpointError("no checkpoint to average")
    first_config = None
    total: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for folder in folders:
        if not is_model_dir(folder):
            raise CheckpointError(f"{folder} is not an IDM model folder ({CONFIG_NAME} + {WEIGHTS_NAME}): the checkpoint is damaged")
        config = load_json(folder / CONFIG_NAME, "IDM config")
        check_config_matches_weights(folder, config)
        if first_config is None:
            first_config = config
        elif config != first_config:
            raise CheckpointError(f"{folder / CONFIG_NAME} differs from {folders[0] / CONFIG_NAME}: the checkpoints "
                                  "hold different networks, which cannot be averaged")  # fmt: skip
        tensors = load_tensors(folder / WEIGHTS_NAME)
        reference = reference or tensors
        try:  # the same names and shapes as the first checkpoint's, every weight finite
            check_weights_fit(reference, tensors, folder / WEIGHTS_NAME, f"the network of {folders[0] / WEIGHTS_NAME}")
        except CheckpointError as err:
            raise CheckpointError(f"{err}; leave that checkpoint out of the average (a later --average-from)") from None
        for key, tensor in tensors.items():
            if tensor.dtype != reference[key].dtype:
                raise CheckpointError(f"{folder / WEIGHTS_NAME}: {key} is {tensor.dtype}, but {reference[key].dtype} "
                                      f"in {folders[0] / WEIGHTS_NAME}")  # fmt: skip
            if not tensor.is_floating_point():
                if not torch.equal(tensor, reference[key]):
                    raise CheckpointError(f"{folder / WEIGHTS_NAME}: the integer tensor {key} differs from "
                                          f"{folders[0] / WEIGHTS_NAME}'s, which an average cannot reconcile")  # fmt: skip
                continue
            total[key] = total[key] + tensor.double() if key in total else tensor.double()
    return {key: (total[key] / len(folders)).to(tensor.dtype) if key in total else tensor
            for key, tensor in reference.items()}  # fmt: skip
