"""``idm reconstruct``: reconstruct measurements (or images, simulated on the fly) with a trained IDM.

    idm reconstruct --input meas.npz [--checkpoint DIR] --out DIR              # from idm simulate
    idm reconstruct --task cs --ratio 0.1 --input IMG_OR_DIR [--checkpoint DIR] --out DIR   # simulate + reconstruct + score
    idm reconstruct --task mri --input FILE.h5 [--acceleration 4] [--checkpoint DIR] --out DIR   # fastMRI single-coil
    idm reconstruct --task ct --input SINOGRAM.npy [--views 60] [--checkpoint DIR] --out DIR

What the input is:

* ``.npz`` -- an ``idm simulate`` measurement file: each item's operator is
  rebuilt from its recorded config; the checkpoint must have been trained for
  the file's task and operator (CS: the same ratio, block, mode and ``Phi``);
  operator flags that contradict the file are refused.
* ``.h5`` (or a folder of them) -- fastMRI single-coil k-space. A file with a
  ``mask`` is reconstructed with that mask as is; a fully sampled file is
  undersampled retrospectively with a seeded fastMRI mask (``--seed`` + file
  index; ``--acceleration`` / ``--center-fraction``, else the checkpoint's,
  else the task's), one mask per volume, saved as ``mask`` in the output.
  See :mod:`tasks.mri_files` for the normalisation and the output layout.
* a CT sinogram ``.npy`` (with ``--task ct``; a ``.npy`` with a sidecar
  ``.npy.json``, or whose last two axes differ) -- the operator comes from the
  sidecar, else from the checkpoint / task with the image size inferred from
  the detector count; the view count must match ``--views`` and the checkpoint.
* anything else (an image, a CT slice, a folder) -- simulated exactly as
  ``idm simulate`` would (seed ``--seed + i`` modulo 2**32, operator of the checkpoint), then
  reconstructed and scored.

Without ``--checkpoint`` the shipped model that serves the task and operator
is used (:func:`idm.shipped.default_checkpoint`); a request no shipped model
serves is refused with the list of shipped models.

Outputs in ``--out``: ``<name>.png`` (the task's display image: MRI
magnitude, clamped to [0, 1]), ``<name>.npy`` (float32 ``(C, H, W)``
reconstruction in [0, 1] units; CT also ``hu/<name>.npy`` in Hounsfield
units), for ``.h5`` inputs ``<stem>.h5`` and ``<stem>_s<k>.png``;
``metrics.csv`` (name, psnr, ssim, seconds) when the ground truth is known
(image input, ``x_true`` in the ``.npz``, ``reconstruction_esc`` or fully
sampled k-space in the ``.h5``); ``reconstruct.json`` (the settings, each
image's size and the size its operator measured; ``"complete": false``, the
files written and the error when a run stopped part-way).
PSNR/SSIM follow ``benchmarks.protocol.score_function`` (CS: the IDM
authors' protocol; others: [0, 1] images, data_range 1); for ``.h5`` files
they compare the magnitude (in the file's units, centre-cropped) with the
reference, data_range = the reference volume's maximum, and the means are
those of the volumes, each scored as fastMRI's ``evaluate.py`` does (PSNR
over all its voxels, SSIM the mean of its slices').
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from idm.cli.common import (
    OutputFolder,
    add_common_args,
    add_ensemble_arg,
    add_operator_args,
    add_precision_arg,
    add_size_arg,
    command_line,
    load_for_request,
    operator_overrides,
    require_installed_task,
    resolve_device,
    resolve_precision_arg,
    seed_everything,
    task_color,
    task_name,
)
from idm.cli.simulate import (
    OperatorPlan,
    check_limit,
    get_task,
    load_images,
    measure_image,
)
from tasks.data.images import KSPACE_SUFFIXES, files_in

METRIC_FIELDS = ("name", "psnr", "ssim", "seconds")
#: The subfolder of CT's Hounsfield-unit images, one `<name>.npy` each beside the `<name>.npy` in [0, 1] units.
HU_FOLDER = "hu"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "reconstruct",
        help="reconstruct measurements (.npz, fastMRI .h5, CT sinogram) or images (simulated) with a trained IDM",
        description=__doc__.split("\n\n")[0],
        epilog="Inputs: an idm simulate .npz; a fastMRI single-coil .h5 (or a folder of them); a CT sinogram .npy "
        "(--task ct); or images / CT slices / a folder, simulated with seed --seed + i (modulo 2**32), then reconstructed and scored.",
    )
    parser.add_argument("--input", required=True, help="measurement .npz, fastMRI .h5, CT sinogram .npy, or an image file / folder")
    parser.add_argument("--task", help="cs, inpainting, mri, ct (read from the file for .npz; mri for .h5; for images, "
                        "the --checkpoint's task when not given, else ct for DICOM files)")
    parser.add_argument("--checkpoint", help="IDM model folder, idm train --out folder or a shipped model's name (default: the shipped model serving the task and operator)")
    parser.add_argument("--color", choices=("gray", "y", "rgb"), help="colour mode of image files (default: the task's)")
    parser.add_argument("--limit", type=int, help="only the first N images / slices")
    add_size_arg(parser, "input image (simulated inputs only)")
    parser.add_argument("--no-crop", action="store_true", help=".h5: write the full k-space-size images, not fastMRI's centre crop")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_precision_arg(parser)
    add_ensemble_arg(parser)
    add_operator_args(parser)
    add_common_args(parser, out_help="output folder (PNG, .npy / .h5, metrics.csv, reconstruct.json)")
    parser.set_defaults(run=run)


# ---- checkpoint --------------------------------------------------------------------------------
def load_model(checkpoint: str | None, task: Any, expect: dict[str, Any], request: dict[str, Any], device: torch.device,
               context: str = "", precision: str = "fp32", flags: dict[str, Any] | None = None,
               img_size: tuple[int, int] | None = None):  # fmt: skip
    """The trained IDM for ``task``: ``checkpoint``, else the shipped model for ``request``; refuses mismatches.

    ``expect``: the operator settings the checkpoint must have been trained with
    (``load_trained``'s ``expect_operator``); ``context`` is added to its error. ``flags`` and
    ``img_size``: see :func:`idm.cli.common.load_for_request`, which loads it.
    The model is prepared for inference in ``precision`` (:mod:`idm.precision`).
    """
    from idm.checkpoint import CheckpointError

    try:
        trained = load_for_request(task, checkpoint, expect, request, device, flags, img_size)
    except CheckpointError as err:
        if context and "does not match" in str(err):
            raise CheckpointError(f"{err}\n{context}") from None
        raise
    channels = trained.model.config.image_channels
    if channels != task.channels:
        raise ValueError(
            f"checkpoint {trained.path} reconstructs {channels}-channel images, but task {task.name} "
            f"(colour {task.color!r}) has {task.channels} channel(s)"
        )
    trained.model.for_inference(precision=precision)
    return trained


# ---- reconstruction loop -----------------------------------------------------------------------
def _display(task: Any, x: torch.Tensor) -> torch.Tensor:
    return task.metric_image(x).clamp(0, 1)


def reconstruct_one(model: Any, item: Any, op: Any, device: torch.device, seed: int, ensemble: int = 1,
                    tall: bool = False) -> tuple[torch.Tensor, float]:  # fmt: skip
    """``(x_hat (1, C, H, W) float32 on the CPU cropped to the image size, seconds)``; ``ensemble``: how many
    flipped and turned copies to average, ``tall``: wide images reconstructed turned tall
    (:func:`idm.ensemble.ensemble_reconstruct`)."""
    from idm.ensemble import ensemble_reconstruct

    y = torch.from_numpy(np.ascontiguousarray(item.y))[None].to(device)
    generator = torch.Generator(device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        x_hat = ensemble_reconstruct(model, y, op, ensemble, generator=generator, tall=tall)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    height, width = item.image_size
    x_hat = x_hat[..., :height, :width].float().cpu()
    if not torch.isfinite(x_hat).all():
        raise ValueError(f"{item.name}: the reconstruction contains NaN or inf (are the checkpoint's weights finite?)")
    return x_hat, seconds


def reconstruct_items(
    trained: Any,
    task: Any,
    pairs: Iterable[tuple[Any, Any]],
    count: int,
    device: torch.device,
    out: Path,
    seed: int,
    progress: bool,
    hu_window: tuple[float, float] | None = None,
    ensemble: int = 1,
    tall: bool = False,
) -> list[dict[str, Any]]:
    """Reconstruct ``(Measurement, operator)`` pairs with ``trained`` (a ``TrainedModel``), averaged over
    ``ensemble`` flips and turns, wide images turned tall with ``tall`` (:mod:`idm.ensemble`), write
    ``<name>.png`` / ``.npy``; one row per item. For a size-bound task (CT), warns once per image size that
    is not the training size."""
    from tqdm.auto import tqdm

    from benchmarks.protocol import score_function
    from benchmarks.report import save_image

    score = score_function(task)
    model = trained.model.to(device)
    warned: set[tuple[int, int]] = set()
    rows = []
    for i, (item, op) in enumerate(tqdm(pairs, total=count, desc="images", disable=not progress or count < 2)):
        warning = trained.size_warning(tuple(item.image_size)) if task.size_bound else None
        if warning and tuple(item.image_size) not in warned:
            warned.add(tuple(item.image_size))
            warnings.warn(warning, stacklevel=1)
        x_hat, seconds = reconstruct_one(model, item, op, device, seed + i, ensemble, tall)
        save_image(_display(task, x_hat), out / f"{item.name}.png")
        np.save(out / f"{item.name}.npy", x_hat[0].numpy().astype(np.float32), allow_pickle=False)
        if hu_window is not None:
            from tasks.data import inverse_hu_window

            (out / HU_FOLDER).mkdir(exist_ok=True)  # a folder of its own: no name of an item's files can be that of another's
            np.save(out / HU_FOLDER / f"{item.name}.npy", inverse_hu_window(x_hat[0, 0].numpy(), *hu_window), allow_pickle=False)
        row: dict[str, Any] = {"name": item.name, "seconds": seconds, "size": list(item.image_size),
                               "operator_size": op.config().get("img_size")}  # fmt: skip
        if item.x_true is not None:
            row["psnr"], row["ssim"] = score(x_hat, torch.from_numpy(item.x_true)[None])
        rows.append(row)
        write_metrics(rows, out)  # kept current: a run stopped part-way keeps the scores it has
    return rows


def write_metrics(rows: list[dict[str, Any]], out: Path) -> dict[str, float] | None:
    """``metrics.csv`` (when any row is scored) and the means."""
    scored = [r for r in rows if "psnr" in r]
    if not scored:
        return None
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in scored:
            writer.writerow({k: (f"{v:.6g}" if k == "seconds" else f"{v:.4f}") if isinstance(v, float) else v for k, v in r.items()})
    finite = [r["psnr"] for r in scored if math.isfinite(r["psnr"])]
    return {
        "psnr": statistics.fmean(finite) if finite else float("inf"),
        "ssim": statistics.fmean(r["ssim"] for r in scored),
        "count": len(scored),
    }


def _summary(rows: list[dict[str, Any]], means: dict[str, float] | None, out: Path, what: str) -> str:
    lines = [f"idm reconstruct: {what} -> {out}"]
    for r in rows:
        score = f"{r['psnr']:.2f} dB / SSIM {r['ssim']:.4f}" if "psnr" in r else "no ground truth"
        lines.append(f"  {r['name']}: {score} ({r['seconds']:.2f} s)")
    if means is not None:
        unit = means.get("of", "images")
        lines.append(f"  mean over {means['count']} {unit}: PSNR {means['psnr']:.2f} dB, SSIM {means['ssim']:.4f} "
                     f"(per {'slice' if unit == 'volumes' else 'image'}: {out / 'metrics.csv'})")  # fmt: skip
    return "\n".join(lines)


def _short(config: dict[str, Any]) -> dict[str, Any]:
    """An operator config without its bulky parts (masks, columns), for records."""
    return {k: v for k, v in config.items() if (not isinstance(v, (list, dict)) or k == "img_size") and k != "seed"}


# ---- the inputs ----------------------------------------------------------------------------------
def input_kind(path: Path, task_name: str | None) -> str:
    """``"npz"``, ``"h5"``, ``"sinogram"`` or ``"images"`` (see the module docstring)."""
    from tasks.measurements import looks_like_sinogram

    if not path.exists():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".npz":
            return "npz"
        if suffix in KSPACE_SUFFIXES:
            return "h5"
        if suffix == ".npy" and task_name in (None, "ct") and looks_like_sinogram(path):
            return "sinogram"
        return "images"
    if task_name in (None, "mri") and files_in(path, KSPACE_SUFFIXES):
        return "h5"
    return "images"


def _check_flags_against(overrides: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """Operator flags must agree with the operator recorded in a measurement file."""
    from operators.family import same_setting

    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if key not in config:
            from tasks.measurements import describe_operator

            raise ValueError(f"{where} was measured with the {describe_operator(config)}, which records no {key}: "
                             f"{flag} does not apply to it (the operator comes from the file)")  # fmt: skip
        have = config[key]
        if not same_setting(have, value):
            raise ValueError(
                f"{where} was measured with {key}={have!r}; {flag} {value} does not match (the operator comes from the file)"
            )


def _from_npz(args: argparse.Namespace, device: torch.device, out: Path) -> tuple[list[dict], dict[str, Any], str]:
    from operators import without_size_and_seed
    from tasks.measurements import describe_operator, load_measurements

    path = Path(args.input)
    mset = load_measurements(path)
    if args.task and args.task != mset.task:
        raise ValueError(f"{path} holds measurements of task {mset.task!r}, not {args.task!r} (--task)")
    recorded_color = mset.meta.get("color")
    if args.color and recorded_color and args.color != recorded_color:
        raise ValueError(f"{path} was measured from {recorded_color!r} images; --color {args.color} does not match "
                         "(the colour mode comes from the file)")  # fmt: skip
    color = args.color or recorded_color
    require_installed_task(mset.task, f"{path} holds measurements of", args.checkpoint, mset.meta.get("task_package"))
    task = get_task(mset.task)
    if color and color != task.color:
        task = get_task(mset.task, color)
    overrides = operator_overrides(args)
    first = mset.items[0].operator
    shared = without_size_and_seed(first)
    for item in mset.items[1:]:
        if without_size_and_seed(item.operator) != shared:
            raise ValueError(
                f"{path}: its items were measured with different operators ({item.name}: {describe_operator(item.operator)} vs "
                f"{mset.items[0].name}: {describe_operator(first)}); one IDM serves one operator, split the file"
            )
    _check_flags_against(overrides, first, str(path))
    trained = load_model(
        args.checkpoint, task, expect=shared, request=shared, device=device, precision=args.precision,
        context=f"(the measurements in {path} were taken with the {describe_operator(shared)})",
    )  # fmt: skip
    check_limit(args.limit)
    count = len(mset.items) if args.limit is None else min(args.limit, len(mset.items))
    window = tuple(mset.meta["window"]) if task.operator == "ct" and isinstance(mset.meta.get("window"), list) else None
    pairs = ((mset.items[i], mset.operator(i)) for i in range(count))
    rows = reconstruct_items(trained, task, pairs, count, device, out, args.seed, not args.no_progress, window,
                             args.ensemble, args.tall)
    settings = {
        "task": task.name,
        "operator": _short(first),
        "operator_seeds": [m.seed for m in mset.items[:count]] if first.get("seed") is not None else None,
        "checkpoint": str(trained.path),
        "window": window,
    }
    return rows, settings, f"{count} measurement(s) of task {task.name} from {path}"


def _from_images(args: argparse.Namespace, device: torch.device, out: Path) -> tuple[list[dict], dict[str, Any], str]:
    from tasks.data import DEFAULT_HU_WINDOW

    task = get_task(task_name(args, Path(args.input)), task_color(args))
    check_limit(args.limit)
    names, dataset = load_images(task, args.input, args.limit, args.size)
    overrides, trained = _model_for_flags(args, task, device, img_size=tuple(dataset[0].shape[-2:]))
    plan = OperatorPlan(task, overrides, trained.operator, args.seed)

    def pairs():
        for i, name in enumerate(names):
            yield measure_image(plan, i, name, dataset[i], device, keep_truth=True)

    window = DEFAULT_HU_WINDOW if task.operator == "ct" else None
    rows = reconstruct_items(trained, task, pairs(), len(names), device, out, args.seed, not args.no_progress, window,
                             args.ensemble, args.tall)
    settings = {
        "task": task.name,
        "operator": _short({k: v for k, v in plan.settings.items()}),
        "operator_seeds": f"{args.seed} + image index (mod 2**32)",
        "checkpoint": str(trained.path),
        "window": window,
        "padding": f"zero-padded to a multiple of {plan.block}" if plan.block else None,
        "resized_to": args.size,
    }
    resized = f", resized to {args.size}x{args.size}" if args.size else ""
    return rows, settings, f"{len(names)} image(s) of {args.input}{resized}, simulated ({task.name}) and reconstructed"


def _model_for_flags(args: argparse.Namespace, task: Any, device: torch.device, img_size: tuple[int, int] | None = None,
                     **fixed: Any):  # fmt: skip
    """``(operator flags, checked model)``: the checkpoint (or shipped model) for the task's operator with the
    user's flags (plus ``fixed`` settings read from the input) on top of the defaults. ``img_size``: the first
    input's, where the operator's own check of the flags can run when no model serves them."""
    overrides = operator_overrides(args)
    settings = {**overrides, **fixed}
    request = {"name": task.operator, **task.check_flags(**settings)}  # also refuses a flag the operator would ignore
    trained = load_model(args.checkpoint, task, expect={"name": task.operator, **overrides}, request=request, device=device,
                         precision=args.precision, flags=settings, img_size=img_size)  # fmt: skip
    return overrides, trained


def _from_sinogram(args: argparse.Namespace, device: torch.device, out: Path) -> tuple[list[dict], dict[str, Any], str]:
    from tasks.data import DEFAULT_HU_WINDOW
    from operators import without_size_and_seed
    from tasks.measurements import Measurement, OperatorCache, ct_width_for_detectors, describe_operator, load_sinogram

    task = get_task(args.task or "ct")
    if task.operator != "ct":
        raise ValueError(f"a sinogram needs a CT task, got --task {task.name}")
    path = Path(args.input)
    overrides = operator_overrides(args)
    task.operator_kwargs(**overrides)
    cache = OperatorCache()
    sino = load_sinogram(path, cache)
    views, detectors = sino.views, sino.detectors
    if "views" in overrides and overrides["views"] != views:
        raise ValueError(f"{path}: the sinogram has {views} views (its last axis), but --views {overrides['views']} was given")
    if sino.info is not None:
        config = dict(sino.info["operator"])
        _check_flags_against(overrides, config, str(path))
        shared = without_size_and_seed(config)
        trained = load_model(
            args.checkpoint, task, expect=shared, request=shared, device=device, precision=args.precision,
            context=f"(the sinogram {path} was measured with the {describe_operator(config)})",
        )  # fmt: skip
        window = tuple(sino.info.get("window") or DEFAULT_HU_WINDOW)
    else:
        width = ct_width_for_detectors(detectors)
        # a (views, detectors) array: its views axis would match an image width
        transposed = ct_width_for_detectors(views) is not None and views > detectors
        swap = "; if it is stored as (views, detectors), transpose it (np.save(f, a.T))" if transposed else ""
        if width is None:
            raise ValueError(
                f"{path}: {detectors} detector cells match no square image (a W x W image has ceil(sqrt(2) W) cells); "
                f"is this a sinogram of the ct operator, (detectors, views)?{swap}"
            )
        try:
            _, trained = _model_for_flags(args, task, device, img_size=(width, width), views=views)
        except ValueError as err:  # say how the file was read: a non-square CT slice looks like a sinogram
            raise type(err)(f"{err}\n({path} was read as a sinogram of {detectors} detectors x {views} views, as a "
                            f".npy without sidecar whose two axes differ; a CT slice must be square{swap})") from None
        trained_views = (trained.operator or {}).get("views")
        if trained_views is not None and trained_views != views:
            raise ValueError(
                f"{path}: the sinogram has {views} views, but checkpoint {trained.path} was trained for {trained_views} views"
                + (swap if trained_views == detectors else "")
            )
        if trained.operator:
            config = {**trained.operator, **overrides, "img_size": [width, width]}
        else:
            config = task.make_operator((width, width), **{**overrides, "views": views}).config()
        window = DEFAULT_HU_WINDOW
    op = cache.get(config)
    if tuple(op.measurement_shape()[1:]) != (detectors, views):
        raise ValueError(
            f"{path}: the sinogram is {detectors} x {views}, but the {describe_operator(config)} measures "
            f"{op.measurement_shape()[1]} x {op.measurement_shape()[2]}"
        )
    check_limit(args.limit)
    count = sino.data.shape[0] if args.limit is None else min(args.limit, sino.data.shape[0])
    width = int(config["img_size"][1])
    items = [Measurement(sino.names[i], sino.data[i][None], config, (int(config["img_size"][0]), width)) for i in range(count)]
    rows = reconstruct_items(trained, task, ((m, op) for m in items), count, device, out, args.seed, not args.no_progress, window,
                             args.ensemble, args.tall)
    settings = {"task": task.name, "operator": _short(config), "checkpoint": str(trained.path), "window": window,
                "sidecar": sino.info is not None}  # fmt: skip
    return rows, settings, f"{count} sinogram(s) of {path} ({detectors} detectors x {views} views)"


def _from_h5(args: argparse.Namespace, device: torch.device, out: Path) -> tuple[list[dict], dict[str, Any], str]:
    from tqdm.auto import tqdm

    from benchmarks.report import save_image
    from idm import __version__
    from idm.metrics import psnr, ssim
    from tasks import mri_files
    from tasks.data import center_crop, check_single_coil, load_fastmri_slices
    from tasks.measurements import Measurement

    task = get_task(args.task or "mri")
    if task.operator != "mri":
        raise ValueError(f"fastMRI .h5 files hold MRI k-space; use --task mri (got --task {task.name})")
    source = Path(args.input)
    files = [source] if source.is_file() else files_in(source, KSPACE_SUFFIXES)
    check_limit(args.limit)
    shapes = [check_single_coil(path) for path in files]  # every file, before the first is reconstructed
    overrides, trained = _model_for_flags(args, task, device, img_size=shapes[0][1:] if shapes else None)
    model = trained.model.to(device)
    warning = trained.phase_warning()
    if warning:
        warnings.warn(warning, stacklevel=1)
    plan = OperatorPlan(task, overrides, trained.operator, args.seed)
    trained_acc = (trained.operator or {}).get("acceleration")
    rows: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    masks = []
    remaining = args.limit
    for f_index, path in enumerate(files):
        if remaining is not None and remaining <= 0:
            break
        volume = load_fastmri_slices(path)
        slices, height, width = (int(s) for s in volume.kspace.shape)
        columns = mri_files.file_mask_columns(volume)
        if columns is not None:
            from operators import make

            op = make("mri", img_size=(height, width), mask_type="given", columns=columns)
            masks.append(f"{path.name}: the file's mask ({int(columns.sum())} of {width} columns, acceleration {op.acceleration:.2f})")
            unused = [f"--{k.replace('_', '-')}" for k in ("acceleration", "center_fraction") if k in overrides]
            if unused:
                print(f"note: {path.name} has its own k-space mask, used as is; {' and '.join(unused)} do not apply to it", file=sys.stderr)
            if trained_acc is not None and abs(op.acceleration / float(trained_acc) - 1) > 0.25:
                warnings.warn(f"{path.name}'s mask samples 1/{op.acceleration:.2f} of k-space; the checkpoint was trained "
                              f"for acceleration {trained_acc}", stacklevel=1)  # fmt: skip
        else:
            op = plan.operator(f_index, (height, width))
            columns = op.mask[0]
            masks.append(f"{path.name}: seeded mask (seed {op.config().get('seed')}, {int(columns.sum())} of {width} columns)")
        scale = mri_files.volume_scale(volume.kspace, columns, source=str(path))
        ys = mri_files.slice_measurements(volume.kspace, columns, scale)
        crop = None if args.no_crop else mri_files.output_crop(volume)
        reference, ref_kind = mri_files.reference_volume(volume, volume.mask is not None, crop)
        count = slices if remaining is None else min(slices, remaining)
        data_range = None if reference is None else float(reference.max())  # the whole volume's, whatever --limit
        recon, estimates = [], []
        for s in tqdm(range(count), desc=f"{path.name} slices", disable=args.no_progress or count < 2):
            item = Measurement(f"{path.stem}_s{s}", ys[s].numpy(), op.config(), (height, width))
            x_hat, seconds = reconstruct_one(model, item, op, device, args.seed + s, args.ensemble, args.tall)
            magnitude = task.metric_image(x_hat)[0, 0]  # normalised units
            shown = magnitude if crop is None else center_crop(magnitude, crop)
            save_image(shown.clamp(0, 1)[None, None], out / f"{item.name}.png")
            recon.append((shown * scale).numpy().astype(np.float32))
            row: dict[str, Any] = {"name": item.name, "seconds": seconds}
            if reference is not None:
                ref = reference[s]
                est = center_crop(magnitude * scale, tuple(ref.shape[-2:]))
                estimates.append(est)
                row["psnr"] = psnr(est, ref, data_range=data_range)
                row["ssim"] = ssim(est, ref, data_range=data_range)
            rows.append(row)
            write_metrics(rows, out)
        if reference is not None:  # fastMRI's evaluate.py: one PSNR over the volume's voxels, SSIM its slices' mean
            volumes.append({"name": path.stem, "slices": count,
                            "psnr": psnr(torch.stack(estimates), reference[:count], data_range=data_range),
                            "ssim": statistics.fmean(r["ssim"] for r in rows[-count:])})  # fmt: skip
        if remaining is not None:
            remaining -= count
        attrs = {
            # the input's attributes, less max and norm: fastMRI's statistics of its reference images, not of these
            **{k: v for k, v in volume.attrs.items() if k not in ("max", "norm")},
            "idm_version": __version__,
            "idm_checkpoint": str(trained.path),
            "idm_operator": json.dumps(op.config()),
            "idm_scale": scale,
            "idm_slices": count,
            "idm_reference": ref_kind or None,
            "idm_ensemble": args.ensemble,  # how the reconstruction was made (--ensemble, --tall)
            "idm_tall": args.tall,
        }
        mri_files.write_reconstruction_h5(out / f"{path.stem}.h5", np.stack(recon), columns, attrs)
    settings = {
        "task": task.name,
        "operator": _short({k: v for k, v in plan.settings.items()}),
        "masks": masks,
        "checkpoint": str(trained.path),
        "normalisation": "k-space / max |zero-filled image| of the volume; undone in reconstruction",
        "metrics": "magnitude vs the reference (reconstruction_esc, else fully sampled), centre-cropped, data_range = "
                   "reference volume max; per volume as fastMRI's evaluate.py (PSNR over its voxels, SSIM its slices' "
                   "mean), the mean over volumes",
        "volumes": volumes or None,
    }
    return rows, settings, f"{len(rows)} slice(s) of {len(files)} fastMRI file(s) in {source}"


# ---- the command -------------------------------------------------------------------------------
def _record_interrupted(record: dict[str, Any], error: BaseException, out: Path, started: float) -> None:
    """After a failure part-way through, say in ``reconstruct.json`` which outputs this run wrote and why it
    stopped (nothing is written when it wrote no output, so an earlier run's record stays)."""
    from idm.checkpoint import save_json

    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and p.name != "reconstruct.json" and p.stat().st_mtime >= started)  # fmt: skip
    if written:
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
        save_json({**record, "complete": False, "stopped_by": reason, "written": written}, out / "reconstruct.json")


def run(args: argparse.Namespace) -> int:
    from idm import __version__
    from idm.checkpoint import save_json

    source = Path(args.input)
    kind = input_kind(source, args.task)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    resolve_precision_arg(args, device)
    if args.no_crop and kind != "h5":
        raise ValueError(f"--no-crop applies to fastMRI .h5 files (their centre crop); {source} is read as {kind}")
    if args.size is not None and kind != "images":
        raise ValueError(f"--size resizes images before they are measured; {source} is read as {kind}, which holds "
                         "measurements already")  # fmt: skip
    folder = OutputFolder(args.out, "reconstruct.json", "idm reconstruct")
    out = folder.path
    input_folder = source if source.is_dir() else source.parent
    if out.resolve() == input_folder.resolve():  # its outputs are named as the inputs: they would replace them
        raise ValueError(f"--out {out} is the input's folder: its reconstructions would overwrite the input files; "
                         "write them to another folder")  # fmt: skip
    folder.create()
    handler: Callable = {"npz": _from_npz, "h5": _from_h5, "sinogram": _from_sinogram, "images": _from_images}[kind]
    record = {
        "command": command_line("reconstruct"),
        "idm_version": __version__,
        "input": str(source),
        "input_kind": kind,
        "device": str(device),
        "precision": args.precision,
        "ensemble": args.ensemble,
        "tall": args.tall,
        "seed": args.seed,
    }
    started = time.time() - 1.0  # file times come from the kernel's coarser clock
    try:
        rows, settings, what = handler(args, device, out)
    except (Exception, KeyboardInterrupt) as error:
        _record_interrupted(record, error, out, started)
        folder.discard_if_empty()
        raise
    means = write_metrics(rows, out)
    if settings.get("volumes"):  # fastMRI files: the figures are the volumes', as evaluate.py gives them
        means = {"psnr": statistics.fmean(v["psnr"] for v in settings["volumes"]),
                 "ssim": statistics.fmean(v["ssim"] for v in settings["volumes"]), "count": len(settings["volumes"]),
                 "of": "volumes"}  # fmt: skip
    save_json(
        {
            **record,
            "complete": True,
            **settings,
            "items": [r["name"] for r in rows],
            "sizes": {r["name"]: {"image": r["size"], "operator": r["operator_size"]} for r in rows if "size" in r} or None,
            "mean": means,
        },
        out / "reconstruct.json",
    )
    print(_summary(rows, means, out, what))
    return 0
