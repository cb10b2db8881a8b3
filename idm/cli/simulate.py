"""``idm simulate``: measure images with a task's forward model and save the measurements.

    idm simulate --task cs --ratio 0.1 --input IMG_OR_DIR [--checkpoint DIR] [--keep-truth] --out meas.npz
    idm simulate --task ct --views 60 --input SLICE.dcm|SLICE.npy|DIR --out sino.npy   # + sino.npy.json

Image ``i`` (in the loader's order: sorted files, slices of a volume in order)
is measured by an operator drawn with seed ``--seed + i`` (modulo 2**32). Which operator:

* with ``--checkpoint``: the one the checkpoint was trained with (its
  recorded config; for CS the same ``Phi``), with the operator flags on top
  -- flags that contradict the checkpoint are refused. Use this when the
  measurements are meant for that checkpoint;
* without: the task's defaults with the flags on top (the operator
  ``idm train`` uses with the same flags, hence the same ``Phi``).

CS follows the benchmark protocol: images are zero-padded to a multiple of
the block before measuring (the reconstruction is cropped back); an image
smaller than one block is refused. CT slices are read in Hounsfield units and
windowed to [0, 1] with the task's window ([-1024, 3071] HU).

Output (see :mod:`tasks.measurements`): ``--out F.npz`` (every task), or for
CT ``--out F.npy``, a sinogram ``(detectors, views)`` / ``(N, detectors,
views)`` plus the sidecar ``F.npy.json``. ``--keep-truth`` stores the
ground-truth images in the ``.npz`` (``x_true``), so ``idm reconstruct``
can score its results; without it the file holds no image.

The helpers here (:class:`OperatorPlan`, :func:`load_images`,
:func:`measure_image`) are shared with ``idm reconstruct``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from idm.cli.common import (
    add_common_args,
    add_operator_args,
    add_size_arg,
    command_line,
    operator_overrides,
    resolve_device,
    seed_everything,
    task_color,
    task_name,
)
from tasks.data.images import KSPACE_SUFFIXES, files_in


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="measure images with a task's forward model; write the measurements (.npz, or a CT sinogram .npy)",
        description=__doc__.split("\n\n")[0],
        epilog="Image i is measured with operator seed --seed + i (modulo 2**32). With --checkpoint the operator is the one the "
        "checkpoint was trained with (the same CS Phi), else the task's defaults; operator flags go on top.",
    )
    parser.add_argument("--task", help="cs, inpainting, mri, ct, or a task of your own (default: the --checkpoint's task, else ct for DICOM files)")
    parser.add_argument("--input", required=True, help="an image / CT slice file or a folder of them, in the task's format")
    parser.add_argument("--checkpoint", help="take the operator from this IDM checkpoint (model folder, idm train --out or a shipped model's name)")
    parser.add_argument("--keep-truth", action="store_true", help="also store the ground-truth images (x_true) in the .npz")
    parser.add_argument("--color", choices=("gray", "y", "rgb"), help="colour mode of image files (default: the task's)")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    add_size_arg(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_operator_args(parser)
    add_common_args(parser, out_help="measurement file: F.npz, or for --task ct also F.npy (sinogram + F.npy.json)")
    parser.set_defaults(run=run)


# ---- shared with idm reconstruct -------------------------------------------------------------
def get_task(name: str, color: str | None = None):
    import tasks

    task = tasks.get(name)
    if color and color != task.color:
        task = task.with_color(color)
    return task


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")


class OperatorPlan:
    """Which operator measures image ``i`` of size ``(H, W)``: seeded ``seed + i`` (see the module docstring).

    The first operator comes from :func:`benchmarks.protocol.operator_factory`
    (the task's defaults or the checkpoint's config, with the flags on top);
    the others are the same config with their own ``img_size`` and ``seed``,
    built through a :class:`tasks.measurements.OperatorCache` (fast redraws).
    """

    def __init__(self, task: Any, overrides: dict[str, Any], trained_operator: dict[str, Any] | None, seed: int, cache=None):
        from benchmarks.protocol import operator_factory, uses_cs_protocol
        from tasks.measurements import OperatorCache

        self.task = task
        self.seed = seed
        self.cache = cache or OperatorCache()
        self._factory = operator_factory(task, overrides, trained_operator, seed)
        self._template: dict[str, Any] | None = None
        #: the operator settings in force (defaults < checkpoint < flags), without img_size / seed
        settings = {"name": task.operator, **task.operator_kwargs(), **(trained_operator or {}), **overrides}
        self.settings = {k: v for k, v in settings.items() if k not in ("img_size", "seed")}
        self.block = self.settings.get("block") if uses_cs_protocol(task) else None

    def operator(self, index: int, size: tuple[int, int]):
        from benchmarks.protocol import image_seed
        from operators.conformance import check_plugin_operator

        if self._template is None:
            op = self._factory(index, tuple(size))
            check_plugin_operator(op)  # a plug-in operator's slip named before its measurements are written
            self._template = op.config()
            self.cache.put(op, self._template)
            return op
        config = {**self._template, "img_size": [int(s) for s in size]}
        if "seed" in config:
            config["seed"] = image_seed(self.seed, index)
        return self.cache.get(config)


class InputImages:
    """The first images of a task's dataset, each read when indexed: ``images[i]`` is ``(C, H, W)`` in the task's range,
    resized to ``size x size`` when ``size`` is given (:func:`tasks.data.resize_square`)."""

    def __init__(self, dataset: Any, names: list[str], size: int | None = None, complex_pairs: bool = False):
        self.dataset, self.names, self.size, self.complex_pairs = dataset, names, size, complex_pairs

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        from tasks.data import resize_square

        x = self.dataset[index]
        return x if self.size is None else resize_square(x, self.size, self.names[index], self.complex_pairs)


def load_images(task: Any, path: str | Path, limit: int | None = None, size: int | None = None) -> tuple[list[str], InputImages]:
    """``(names, images)`` of the task's images under ``path`` (first ``limit``, resized to ``size`` if given);
    names are made unique."""
    from tasks.data import check_size
    from tasks.measurements import unique_names

    check_size(size)
    dataset = task.dataset([str(path)], crop=None, augment=False, seed=0)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    name_of = getattr(dataset, "item_name", lambda i: f"image_{i:03d}")
    names = unique_names(name_of(i) for i in range(count))
    return names, InputImages(dataset, names, size, task.complex_images)


def measure_image(plan: OperatorPlan, index: int, name: str, x: torch.Tensor, device: torch.device, keep_truth: bool):
    """Measure image ``index`` (``(C, H, W)`` in [0, 1]): ``(Measurement, operator)``.

    Pads to the CS block (the protocol); refuses an image smaller than a block, or, when its truth is kept
    (to be scored), smaller than SSIM's 7x7 window.
    """
    from operators import OperatorInputError
    from tasks.data import check_image_measurable
    from tasks.measurements import Measurement

    height, width = (int(s) for s in x.shape[-2:])
    block = plan.block
    check_image_measurable(name, height, width, block, scored=keep_truth)
    padded = x
    if block:
        padded = torch.nn.functional.pad(x, (0, (-width) % block, 0, (-height) % block))
    try:
        op = plan.operator(index, tuple(padded.shape[-2:]))
    except OperatorInputError as err:
        raise OperatorInputError(f"{name} ({height}x{width}): {err}") from None
    with torch.no_grad():
        y = op.A(padded[None].to(device=device, dtype=torch.float32))[0]
    config = op.config()
    item = Measurement(
        name=name,
        y=y.cpu().numpy(),
        operator=config,
        image_size=(height, width),
        seed=config.get("seed"),
        x_true=x.cpu().numpy() if keep_truth else None,
    )
    return item, op


def checkpoint_operator(path: str, task: Any, overrides: dict[str, Any], device: torch.device | str = "cpu"):
    """The operator config an IDM checkpoint was trained with (``None`` for a bare model folder); refuses mismatches."""
    from idm.train import load_trained

    trained = load_trained(path, expect_task=task.name, expect_operator={"name": task.operator, **overrides}, device=device,
                           operator_defaults=task.operator_kwargs())  # as idm reconstruct: a family's member at the task's defaults
    return trained.operator


# ---- the command -----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import tasks
    from idm import __version__
    from tasks.data import DEFAULT_HU_WINDOW
    from tasks.measurements import check_replaceable, describe_operator, save_measurements, save_sinogram

    task = get_task(task_name(args, Path(args.input)), task_color(args))
    overrides = operator_overrides(args)
    task.check_flags(**overrides)  # refuses flags the task does not take or would ignore, before any work
    check_limit(args.limit)
    out = Path(args.out)
    suffix = out.suffix.lower()
    sinogram = suffix == ".npy"
    if suffix not in (".npz", ".npy") or (sinogram and task.operator != "ct"):
        allowed = "F.npz or F.npy (a sinogram)" if task.operator == "ct" else "F.npz"
        raise ValueError(f"--out {args.out}: the measurement file must be {allowed}")
    if sinogram and args.keep_truth:
        raise ValueError("--keep-truth stores the images in an .npz: use --out F.npz (a sinogram .npy holds measurements only)")
    source = Path(args.input)
    inputs = [p.resolve() for p in source.iterdir()] if source.is_dir() else [source.resolve()]
    if out.resolve() in inputs:
        raise ValueError(f"--out {out} is one of the input files: the measurements would replace it; write them elsewhere")
    check_replaceable(out)
    if source.suffix.lower() in KSPACE_SUFFIXES or (task.operator == "mri" and source.is_dir() and files_in(source, KSPACE_SUFFIXES)):
        raise ValueError(
            f"{source}: fastMRI .h5 files already hold measured k-space; reconstruct them directly with "
            f"`idm reconstruct --task mri --input {source}` (simulate measures images)"
        )
    seed_everything(args.seed)
    device = resolve_device(args.device)

    trained_operator = checkpoint_operator(args.checkpoint, task, overrides) if args.checkpoint else None
    plan = OperatorPlan(task, overrides, trained_operator, args.seed)
    names, dataset = load_images(task, source, args.limit, args.size)
    items = []
    for i, name in enumerate(tqdm(names, desc="images", disable=args.no_progress or len(names) < 2)):
        item, _ = measure_image(plan, i, name, dataset[i], device, args.keep_truth)
        items.append(item)

    extra = {
        "idm_version": __version__,
        "command": command_line("simulate"),
        "input": str(source),
        "resized_to": args.size,
        "seed": args.seed,
        "operator_seeds": f"{args.seed} + image index (mod 2**32)" if items[0].seed is not None else None,
        "operator_source": f"checkpoint {args.checkpoint}" if trained_operator else "task defaults and flags",
        "checkpoint": args.checkpoint,
        "color": task.color,
        "channels": task.channels,
        "padding": f"zero-padded to a multiple of the {plan.block}x{plan.block} block" if plan.block else None,
    }
    if task.operator == "ct":
        extra["window"] = list(DEFAULT_HU_WINDOW)
    package = tasks.provider(task.name)
    if package:  # a plug-in task's: where it is not installed, the file names what to install
        extra["task_package"] = package
    first = items[0].operator
    if sinogram:
        configs = {tuple(m.operator["img_size"]) for m in items}
        if len(configs) > 1:
            raise ValueError(
                f"the slices have different sizes ({', '.join('x'.join(map(str, c)) for c in sorted(configs))}); "
                "one sinogram .npy holds slices of one size: write --out F.npz instead"
            )
        import numpy as np

        data = np.stack([m.y[0] for m in items])  # one channel: (N, detectors, views)
        npy, side = save_sinogram(out, data, first, [m.name for m in items], extra)
        shape = data.shape[1:] if len(data) == 1 else data.shape
        written = f"{npy} (sinogram {'x'.join(map(str, shape))}: {'slices x ' if len(data) > 1 else ''}detectors x views) and {side}"
    else:
        save_measurements(out, task.name, items, extra)
        written = str(out)
    truth = "ground truth stored (x_true)" if args.keep_truth else "no ground truth stored (--keep-truth adds it)"
    seeds = f"operator seeds {items[0].seed}..{items[-1].seed}" if items[0].seed is not None else "no random operator parts"
    sizes = {tuple(m.operator["img_size"]) for m in items if "img_size" in m.operator}
    shown = {k: v for k, v in first.items() if k != "img_size"} if len(sizes) > 1 else first
    per_image = f"; {len(sizes)} image sizes, each measured at its own (padded) size" if len(sizes) > 1 else ""
    print(
        f"idm simulate: {len(items)} measurement(s) of task {task.name} with the {describe_operator(shown)}{per_image}; "
        f"{seeds}; {truth}; wrote {written}"
    )
    return 0
