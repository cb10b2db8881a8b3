"""What ``benchmarks.tune_dps`` and ``benchmarks.tune_tv`` share: a few seeded TRAINING crops of a
task, its operator at the crop size, and the JSON record of the choice.

The candidates are scored as ``idm benchmark`` scores the task
(:func:`benchmarks.protocol.score_function`: the authors' protocol for CS,
the clamped magnitude for MRI, clamped [0, 1] images otherwise), so the
value chosen is the best by the measure the tables report.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks.protocol import mean_psnr, score_function
from benchmarks.report import script_command
from idm.checkpoint import load_json
from idm.cli.common import positive_int, seed_value
from idm.hardware import hardware_name
from operators import without_size_and_seed


def tuning_parser(doc: str, crop: int, images: int) -> argparse.ArgumentParser:
    """A tuning command's parser, described by the first paragraph of ``doc``, with the task, data and
    output flags (and the operator flags of every command); ``crop`` and ``images`` are their defaults."""
    from idm.cli.common import add_operator_args

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--color", choices=("gray", "y", "rgb"))
    parser.add_argument("--data", nargs="+", required=True, help="TRAINING images (never the test set)")
    parser.add_argument("--crop", type=positive_int, default=crop, help="side of the random square crops")
    parser.add_argument("--images", type=positive_int, default=images, help="how many crops")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=seed_value, default=0, help="picks the crops, their positions and the operator draw")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--random-phase", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                        help="mri: give this share of the crops (all without a value) a random smooth phase, as "
                        "idm train --random-phase does, to tune for real k-space, whose images have one")  # fmt: skip
    add_operator_args(parser)
    return parser


@dataclass
class TuningSetup:
    """``images`` ``(N, C, crop, crop)`` on ``device``, the ``op`` that measures them, and how to score.
    ``phased``: which crops were given a random phase (``--random-phase``)."""

    task: Any
    op: Any
    images: Tensor
    names: list[str]
    device: torch.device
    score: Callable[[Tensor, Tensor], tuple[float, float]]
    phased: list[bool]

    @property
    def signed(self) -> bool:
        """Whether some crops have a phase: their real and imaginary parts then take either sign."""
        return any(self.phased)

    def pinv_psnr(self) -> float:
        """Mean PSNR (dB) of ``A^+ y`` on the crops, scored as the candidates: the level a tuned method must beat."""
        with torch.no_grad():
            return mean_psnr(self.op.A_dagger(self.op.A(self.images)), self.images, self.score)

    def record(self, script: str, argv: list[str] | None, seconds: float, **fields: Any) -> dict[str, Any]:
        """The JSON record: command, hardware, task, operator (sizes and seeds left out), crops, ``A^+ y``'s
        mean PSNR on them, then ``fields``."""
        return {
            "command": script_command(script, argv),
            "hardware": hardware_name(self.device),
            "seconds": round(seconds, 1),
            "task": self.task.name,
            "operator": without_size_and_seed(self.op.config()),
            "images": self.names,
            "crop": int(self.images.shape[-1]),
            "random_phase": [name for name, phased in zip(self.names, self.phased) if phased],
            "scored_as": "idm benchmark scores the task (benchmarks.protocol.score_function)",
            "pinv_mean_psnr": round(self.pinv_psnr(), 3),
            **fields,
        }


def tuning_setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TuningSetup:
    """``--images`` random crops (seeded) of the task's ``--data`` and the task's operator at the crop size.

    With ``--random-phase FRACTION`` each crop is given a random smooth phase
    (:mod:`idm.training.phase`) with that probability, drawn from ``--seed``.
    Anything wrong with the arguments (a grid value below 0, an unknown task,
    unreadable data, an impossible operator setting, a phase for images that
    are not complex) ends in ``parser.error`` with the message that names it,
    before any candidate runs.
    """
    import tasks
    from idm.cli.common import operator_overrides
    from idm.training.phase import check_phase_fraction, random_phase_maps, with_phase

    out = Path(args.out)
    if out.is_dir():
        parser.error(f"--out {out} is a folder: give the JSON file to write")
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        parser.error(f"--out {out}: a folder on its path is a file")
    bad = [v for v in args.grid if not (math.isfinite(v) and v >= 0)]
    if bad:
        parser.error(f"--grid values must be finite and >= 0, got {bad}")
    try:
        task = tasks.get(args.task)
        if args.color:
            task = task.with_color(args.color)
        dataset = task.dataset(args.data, crop=args.crop, augment=False, seed=args.seed)
        torch.manual_seed(args.seed)
        picks = torch.randperm(len(dataset))[: args.images].tolist()
        device = torch.device(args.device)
        images = torch.stack([dataset[i] for i in picks])
        fraction = check_phase_fraction(args.random_phase)
        generator = torch.Generator().manual_seed(args.seed)
        phased = (torch.rand(len(picks), generator=generator) < fraction).tolist()
        if any(phased):
            maps = random_phase_maps(len(picks), *images.shape[-2:], generator)
            rotated = with_phase(images, maps)  # a ValueError for images that are not complex (B, 2, H, W)
            images = torch.where(torch.tensor(phased).view(-1, 1, 1, 1), rotated, images)
        images = images.to(device)
        op = task.make_operator(args.crop, seed=args.seed, **operator_overrides(args))
    except (ValueError, RuntimeError) as err:  # tasks' DataError and operators' errors are ValueErrors
        parser.error(str(err))
    names = [getattr(dataset, "item_name", str)(i) for i in picks]
    return TuningSetup(task, op, images, names, device, score_function(task), phased)


def is_number(text: str) -> bool:
    """Whether a tuned flag's text is a number (else it names the JSON record of a tuning script)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def tuned_value(text: str, task_name: str, operator: dict, key: str, flag: str, script: str, what: str,
                run: dict | None = None) -> float:  # fmt: skip
    """A benchmark flag's value: a number, or the JSON record ``script`` wrote (its ``key``; ``what`` names it).

    A record is checked against the benchmark's task and operator settings
    (those both name) and the method's settings in ``run`` that it records
    (e.g. DPS's ``steps``); a mismatch is a ``ValueError`` that says to pass
    the number instead, to use that value anyway.
    """
    if is_number(text):
        return float(text)
    record = load_json(text, what)
    if not isinstance(record, dict) or key not in record or "task" not in record:
        raise ValueError(f"{flag} {text}: not a number, nor a record of {script} (no 'task' / '{key}')")
    if record["task"] != task_name:
        raise ValueError(f"{flag} {text}: tuned for task {record['task']!r}, this benchmark is {task_name!r}")
    tuned = {**record.get("operator", {}), **{k: record[k] for k in (run or {}) if k in record}}
    here = {**operator, **(run or {})}
    differ = sorted(k for k in set(tuned) & set(here) if tuned[k] != here[k])
    if differ:
        settings = ", ".join(f"{k} {tuned[k]} (here {here[k]})" for k in differ)
        raise ValueError(f"{flag} {text}: tuned with {settings}; pass {flag} {record[key]} to use it anyway")
    return float(record[key])
