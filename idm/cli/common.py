"""Options shared by every ``idm`` command, spelled the same everywhere.

* ``--device`` (default: CUDA when present, else CPU), ``--seed``, ``--out``;
* the operator flags: ``--ratio``, ``--mode``, ``--block`` (cs), ``--mask``
  (inpainting), ``--acceleration``, ``--center-fraction`` (mri), ``--views`` (ct).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_args(parser: argparse.ArgumentParser, out_help: str = "output folder", out_required: bool = True) -> None:
    """``--device``, ``--seed``, ``--out``."""
    parser.add_argument("--device", default=default_device(), help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed, 0 to 2**32 - 1 (default: 0)")
    parser.add_argument("--out", required=out_required, help=out_help)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def crop_size(text: str) -> int | tuple[int, int]:
    """An argparse type for ``--crop``: ``S`` (a square, returned as an int) or ``HxW`` (height by width, a tuple)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"must be a size S or HxW (e.g. 256 or 192x320), got {text!r}")
    try:
        sizes = [positive_int(part) for part in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a size S or HxW of whole numbers >= 1 (e.g. 256 or 192x320), "
                                         f"got {text!r}") from None  # fmt: skip
    if len(sizes) == 1 or sizes[0] == sizes[1]:
        return sizes[0]
    return sizes[0], sizes[1]


def seed_value(text: str) -> int:
    """``--seed``: an integer in [0, 2**32), the range every random source here takes (NumPy's is the narrowest)."""
    seed = _integer(text)
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {seed}")
    return seed


def add_precision_arg(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--precision auto|fp32|bf16`` of the commands that run a trained IDM (resolve it with :func:`resolve_precision_arg`)."""
    from idm.precision import PRECISION_CHOICES

    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=default,
                        help="IDM arithmetic: fp32, bf16 (the U-Net under bfloat16 autocast, states and operator in "
                        "float32), or auto: bf16 where the device computes it natively (CUDA GPUs from Ampere on, "
                        f"CPUs with AVX512-BF16 or AMX), else fp32 (default: {default})")


def add_ensemble_arg(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``--ensemble N`` and ``--tall`` of the commands that run a trained IDM (:mod:`idm.ensemble`); ``several``:
    one or more sizes."""
    from idm.ensemble import ENSEMBLE_SIZES

    parser.add_argument("--ensemble", type=int, choices=ENSEMBLE_SIZES, default=[1] if several else 1,
                        nargs="+" if several else None, metavar="N",
                        help="average IDM over N flipped and turned copies of the image (1, 2, 4 or 8; test-time "
                        "self-ensembling, for any operator: each copy is reconstructed from the same measurements "
                        "through the operator turned with it), at N times the time"
                        + ("; several sizes run as methods idm, idm-x2, ..." if several else "") + " (default: 1)")
    parser.add_argument("--tall", action="store_true",
                        help="reconstruct images wider than tall turned a quarter, standing tall, and turn them back "
                        "(every ensemble member so), at no extra cost: the shipped natural-image models gained "
                        "0.3-1.0 dB on sets of mostly wide images that way (benchmarks/RESULTS.md, Wide images turned tall)"
                        + ("; IDM's methods are then called idm-tall, idm-x2-tall, ..." if several else ""))


def add_training_precision_arg(group: argparse._ArgumentGroup) -> None:
    """``--precision auto|fp32|bf16`` of ``idm train`` and ``idm pretrain`` (:func:`idm.precision.training_precision`)."""
    from idm.precision import PRECISION_CHOICES

    group.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                       help="training arithmetic: fp32, bf16 (the network under bfloat16 autocast, loss and Adam in "
                       "float32), or auto: bf16 on CUDA, fp32 on the CPU (default: auto; unlike inference, a CPU with "
                       "AVX512-BF16 or AMX trains in bf16 only when asked: 1.2-1.7x faster there, README)")  # fmt: skip
    group.add_argument("--no-amp", nargs=0, action=_Replaced, help=argparse.SUPPRESS)


def add_micro_batch_arg(group: argparse._ArgumentGroup) -> None:
    """``--micro-batch N`` of ``idm train`` and ``idm pretrain`` (:mod:`idm.training.micro_batches`)."""
    group.add_argument("--micro-batch", type=positive_int, metavar="N",
                       help="run each step's batch N images at a time, accumulating the gradients: the same update "
                       "up to rounding, with the activations of N images held at once, for a batch that does not fit "
                       "in memory (no faster: README); default: the whole batch at once; a resumed run may change it")  # fmt: skip


class _Replaced(argparse.Action):
    """A flag that was replaced: a usage error that names its replacement (``--no-amp``: ``--precision fp32``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was replaced by --precision fp32 (and --precision auto|bf16)")


def add_size_arg(parser: argparse.ArgumentParser, what: str = "image") -> None:
    """``--size S``: resize every square input image to ``S x S`` before it is measured (``idm simulate``,
    ``idm reconstruct``, ``idm benchmark``; :func:`tasks.data.resize_square`)."""
    parser.add_argument("--size", type=positive_int, help=f"resize every (square) {what} to SIZE x SIZE, anti-aliased, "
                        "e.g. 256 for CT slices of 512 with a model trained at 256 (default: their own size)")  # fmt: skip


def resolve_precision_arg(args: argparse.Namespace, device: torch.device) -> str:
    """Replace ``args.precision`` ``"auto"`` by the precision it means on ``device``; return it (what is recorded)."""
    from idm.precision import resolve_precision

    args.precision = resolve_precision(args.precision, device)
    return args.precision


def ratio_range(text: str) -> float | tuple[float, float]:
    """``"0.1"`` -> 0.1; ``"0.01:0.5"`` -> ``(0.01, 0.5)`` (training on a range of ratios)."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a range LOW:HIGH, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) != 2 or not values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"a range is LOW:HIGH with LOW <= HIGH, got {text!r}")
    return values[0], values[1]


def add_operator_args(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """The forward-model flags; ``None`` means "the task's default".

    With ``training``, ``--ratio`` also takes a range ``LOW:HIGH`` and
    ``--mask`` a comma-separated list (``random,box``): one model is then
    trained on that family of operators (:mod:`operators.family`).
    """
    group = parser.add_argument_group("forward model (defaults come from the task)")
    if training:
        group.add_argument("--ratio", type=ratio_range, help="cs: sampling ratio in (0, 1], or a range LOW:HIGH drawn "
                           "uniformly per iteration; inpainting: fraction of kept pixels (or a range)")
    else:
        group.add_argument("--ratio", type=float, help="cs: sampling ratio in (0, 1]; inpainting: fraction of kept pixels")
    group.add_argument("--mode", choices=("spatial", "permuted"), help="cs: spatial blocks or structurally random")
    group.add_argument("--block", type=int, help="cs: block size (default 32)")
    mask_help = "inpainting: 'random', 'box' or an image file of the kept pixels"
    group.add_argument("--mask", help=mask_help + (" (or a mixture: 'random,box', equal shares, or weighted 'random:1,box:2')" if training else ""))
    group.add_argument("--acceleration", type=float, help="mri: undersampling factor (default 4)")
    group.add_argument("--center-fraction", type=float,
                       help="mri: fully sampled low-frequency fraction (default 0.08; fastMRI pairs 0.04 with 8x)")
    group.add_argument("--views", type=int, help="ct: number of projection angles over 180 degrees")


def add_run_control_args(parser: argparse.ArgumentParser, log_every: int, checkpoint_what: str = "checkpoints"):
    """``--resume``, ``--max-minutes``, cadences and ``--no-progress`` of the training commands; returns the group."""
    run = parser.add_argument_group("run control")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    run.add_argument("--max-minutes", type=float, help="time budget: checkpoint and exit 0 before it runs out")
    run.add_argument("--checkpoint-every", type=int, default=1000, help=f"iterations between {checkpoint_what} (default 1000)")
    run.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    run.add_argument("--log-every", type=int, default=log_every, help=f"iterations between log rows (default {log_every})")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return run


def operator_overrides(args: argparse.Namespace) -> dict:
    """The operator flags the user set, as keyword arguments (unset flags omitted)."""
    from tasks.base import OPERATOR_FLAGS

    return {n: getattr(args, n) for n in OPERATOR_FLAGS if getattr(args, n, None) is not None}


def command_line(name: str) -> str:
    """The command as typed, ``idm NAME ...`` (for provenance records)."""
    return "idm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == [name] else f"idm {name}"


def command_started_at(name: str) -> float:
    """When the command ``idm NAME`` started, on the :func:`time.monotonic` clock, for its time budget
    (``--max-minutes``): the start of the process, Python's start and imports included (seconds), when the
    process runs that command (``idm NAME ...``, ``python -m idm NAME``, ``torchrun -m idm NAME``; read from
    ``/proc`` on Linux), else the time of the call (``main([...])`` called from a running program, or no ``/proc``)."""
    now = time.monotonic()
    if sys.argv[1:2] != [name]:
        return now
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (name)": field 3 on
        started_ticks = float(fields[19])  # field 22: start time, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return now - max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return now


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, with a clear error for an unavailable CUDA."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")  # fmt: skip
    if device.type == "meta":
        raise ValueError(f"--device {name}: meta tensors hold no values to reconstruct or train (use cpu or cuda)")
    if device.type not in ("cpu", "cuda"):  # another backend (mps, xpu...): usable only where this torch has it
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError, ImportError) as err:  # ImportError: torch.hpu and others not built in
            reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"--device {name} is not usable with this torch build: {reason} (use cpu or cuda)") from None
    return device


def run_guarded(call: Callable[[], int | None], name: str) -> int:
    """``call()``'s exit status, with the toolkit's errors (``ValueError`` subclasses, ``OSError``: bad
    arguments, missing files, a device that is not there, a full disk; and safetensors' own write errors)
    printed as ``NAME: error: ...`` and status 2, and so is running out of memory
    (:func:`out_of_memory_message`); Ctrl-C as 130; other errors keep their traceback.
    Every ``idm`` command and benchmark script runs so.
    The toolkit's own warnings (raised from this project's packages) print as one ``NAME: warning: ...`` line,
    without Python's file and source line; other libraries' warnings print as Python prints them."""
    root = Path(__file__).resolve().parents[2]  # where the idm, tasks, operators and benchmarks packages lie
    ours = [root / package for package in ("idm", "tasks", "operators", "benchmarks")]
    shown_by_python = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and any(Path(filename).resolve().is_relative_to(p) for p in ours):
            print(f"{name}: warning: {message}", file=sys.stderr)
        else:
            shown_by_python(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return int(call() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, SafetensorError) as err:  # the last: a failed write of diffusers' save_pretrained
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        message = out_of_memory_message(err)
        if message is None:  # a bug, not the input: its traceback is what tells where
            raise
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2


def out_of_memory_message(err: BaseException) -> str | None:
    """``"out of memory: ..."`` for an allocation that failed (Python's ``MemoryError``, torch's CPU allocator,
    CUDA's ``OutOfMemoryError``), naming the size asked for where torch says it; ``None`` for other errors.
    Checkpoints are written atomically, so a run stopped so loses nothing it had saved."""
    text = str(err).strip()
    if not (isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in text):
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    if asked:
        detail = f"an allocation of {int(asked.group(1)) / 2**30:.1f} GiB failed"
    else:
        detail = text.splitlines()[0][:200] if text else type(err).__name__
    return f"out of memory: {detail}; try smaller images (--size), a smaller batch, or another --device"


def task_name(args: argparse.Namespace, inputs: Path | None = None) -> str:
    """``--task``, else the task that ``--checkpoint``'s training run recorded, else ``"ct"`` when ``inputs`` (a file
    or folder) holds DICOM files only (:func:`dicom_only`); an error naming what is missing."""
    if args.task:
        return args.task
    checkpoint = getattr(args, "checkpoint", None)
    if not checkpoint and inputs is not None and dicom_only(inputs):
        return "ct"  # the DICOM reader refuses any modality but CT
    if not checkpoint:
        raise ValueError("--task is needed (e.g. --task cs), or a --checkpoint whose training run recorded its task")
    from idm.training.trained import recorded_task

    task = recorded_task(checkpoint)
    if task is None:
        raise ValueError(f"--task is needed: checkpoint {checkpoint!r} is a bare model folder that records no task")
    import tasks
    from idm.train import PYTHON_TASK

    if task == PYTHON_TASK and task not in tasks.available():  # a plug-in of that name is a task like any other
        raise ValueError(f"checkpoint {checkpoint!r} was trained from Python (idm.train.train, task {task!r}) with an "
                         "operator the command line cannot rebuild: load it with idm.train.load_trained and call "
                         "model(y, op) with that operator")  # fmt: skip
    require_installed_task(task, f"checkpoint {checkpoint!r} was trained for", checkpoint)
    return task


def require_installed_task(task: str, what: str, checkpoint: str | None, package: Any = None) -> None:
    """A ``ValueError`` ``"<what> task 'x', which this installation does not have (...)"`` when no task of that
    name is installed, naming the package to install: ``package`` (e.g. the one a measurement file records),
    else the plug-in's that ``checkpoint``'s run recorded."""
    import tasks
    from idm.training.trained import recorded_task_package

    available = tasks.available()
    if task in available:
        return
    if not (isinstance(package, str) and package):
        package = recorded_task_package(checkpoint) if checkpoint else None
    needs = f"install {package}, which provided it" if package else "a plug-in task needs the package that provides it"
    raise ValueError(f"{what} task {task!r}, which this installation does not have (available: "
                     f"{', '.join(available)}); {needs}")  # fmt: skip


def task_color(args: argparse.Namespace) -> str | None:
    """``--color``, else the colour mode that ``--checkpoint``'s training run read its images in (a model trained
    with ``--color rgb`` reconstructs RGB images without the flag again), else ``None`` (the task's own)."""
    if args.color or not getattr(args, "checkpoint", None):
        return args.color
    from idm.training.trained import recorded_color, recorded_task

    if args.task and args.task != recorded_task(args.checkpoint):
        return None  # a checkpoint of another task: loading it names that mismatch
    return recorded_color(args.checkpoint)


def load_for_request(task: Any, checkpoint: str | None, expect: dict[str, Any], request: dict[str, Any],
                     device: torch.device, flags: dict[str, Any] | None = None, img_size: tuple[int, int] | None = None,
                     missing: str = ""):  # fmt: skip
    """``load_trained`` of ``checkpoint``, else of the shipped model serving ``request`` (``idm reconstruct``,
    ``idm benchmark``), checked against ``task`` and ``expect`` (its ``expect_operator``).

    ``flags`` (the user's operator flags) and ``img_size`` (the first input's): when no shipped model
    serves the request, or the checkpoint's operator does not match it, the operator's own check of the
    flags runs first, so a bad flag (``--ratio 0``) is the error rather than the model. ``missing`` begins
    the error when no shipped model serves the request.
    """
    from idm.checkpoint import CheckpointError
    from idm.shipped import default_checkpoint, missing_message
    from idm.train import load_trained

    path = checkpoint or default_checkpoint(task.name, request, task.channels)
    if path is None:
        if flags is not None:
            task.check_operator_settings(img_size, **flags)
        raise ValueError(missing + missing_message(task.name, request, task.channels))
    try:
        return load_trained(path, expect_task=task.name, expect_operator=expect, device=device,
                            operator_defaults=task.operator_kwargs())  # fmt: skip
    except CheckpointError as err:
        if flags and "operator" in str(err):  # an operator mismatch: a flag the operator refuses is the error
            task.check_operator_settings(img_size, **flags)
        raise


def check_out_is_not_data(out: str, *data: str | None) -> None:
    """A ``ValueError`` when a training ``--out`` is one of the data folders (``--data``, ``--val-data``): the run's
    files would land among the images (and be read as data by the next run)."""
    target = Path(out).resolve()
    for folder in (d for d in data if d):
        if Path(folder).resolve() == target:
            raise ValueError(f"--out {out} is the data folder {folder}: the run's files would land among its images; "
                             "choose another folder")  # fmt: skip


def dicom_only(path: Path) -> bool:
    """Whether ``path`` is a ``.dcm`` file, or a folder whose visible files are all ``.dcm`` (at least one)."""
    if path.is_file():
        return path.suffix.lower() == ".dcm"
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(p.suffix.lower() == ".dcm" for p in files)


class OutputFolder:
    """``--out`` of a command that writes files named after its inputs (``idm reconstruct``, ``idm benchmark``).

    :meth:`check` refuses a path that is a file, and a folder that already holds files but not ``record``
    (the file every run of the command writes): those files would be overwritten. An earlier run's
    folder may be written again. :meth:`create` makes the folder; :meth:`start` writes a first ``record``
    (so that a run stopped part-way leaves a folder the command may write again); :meth:`discard_if_empty`
    removes the folder again after a failure that wrote nothing else into it.
    """

    def __init__(self, path: str, record: str, command: str):
        self.path = Path(path)
        self.record, self.command = record, command
        self.created: list[Path] = []  # the folders create() made, deepest first
        self.started = False

    def check(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} exists and is not a folder")
        if self.path.is_dir() and not (self.path / self.record).exists():
            held = sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))  # .gitkeep and the like
            if held:
                raise ValueError(
                    f"--out {self.path} already holds files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}) and "
                    f"is not the folder of an earlier `{self.command}` (no {self.record}): they could be overwritten; "
                    "give a new or an empty folder"
                )

    def create(self) -> Path:
        self.check()
        self.created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def start(self, contents: dict) -> None:
        """Write ``contents`` as the ``record`` (JSON), to be replaced by the complete one at the end."""
        from idm.checkpoint import save_json

        save_json(contents, self.path / self.record)
        self.started = True

    def discard_if_empty(self) -> None:
        """Remove the folders :meth:`create` made (``--out`` and new parents), deepest first, while empty
        (the record :meth:`start` wrote does not count)."""
        if self.started and [p.name for p in self.path.iterdir()] == [self.record]:
            (self.path / self.record).unlink()
        for folder in self.created:
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
