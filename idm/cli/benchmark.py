"""``idm benchmark``: IDM and the baselines on the same images, operator and prior; tables and pictures.

    idm benchmark --task cs --ratio 0.1 --data DIR --methods idm,ddnm,dps,pinv,tv \\
                  [--checkpoint DIR] [--prior DIR] [--limit N] [--device cuda] --out DIR

Writes ``OUT/results.csv`` (one row per method and image: method, image,
psnr, ssim, seconds, nfe, peak_mem_mb, status, error; peak_mem_mb is the
method's own peak memory: allocated on CUDA, resident on a Linux CPU),
``OUT/summary.md`` (mean ± std per method), ``OUT/benchmark.json`` (the
run's settings: seeds, operator, prior, checkpoint, DPS step size),
``OUT/tradeoff.png`` (mean PSNR and SSIM against seconds per image, per method:
:mod:`benchmarks.tradeoff`), ``OUT/grids/<image>.png`` and ``OUT/recon/<method>/<image>.png``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from typing import Any

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
    resolve_device,
    resolve_precision_arg,
    seed_everything,
    task_color,
    task_name,
)

#: Run when --methods is not given; DPS joins them where its step size is known (:func:`default_methods`).
DEFAULT_METHODS = "idm,pinv,tv,ddnm"


def default_methods(task: Any, dps_zeta: Any) -> str:
    """:data:`DEFAULT_METHODS`, with ``dps`` where its authors give a step size for the task's operator
    (inpainting) or ``--dps-zeta`` gives one: elsewhere DPS needs a tuned value and would stop the run."""
    from benchmarks.dps import AUTHOR_STEP_SIZES

    return DEFAULT_METHODS + (",dps" if dps_zeta is not None or task.operator in AUTHOR_STEP_SIZES else "")


def add_parser(subparsers) -> None:
    from benchmarks.ddnm import PINV_CHOICES

    parser = subparsers.add_parser(
        "benchmark",
        help="compare IDM with DDNM, DPS and classical solvers on a folder of images",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--task", help="cs, inpainting, mri, ct, or a task of your own (default: the --checkpoint's task)")
    parser.add_argument("--data", required=True, nargs="+", help="test images (folders or files) in the task's format (mri: also fully sampled fastMRI .h5 files)")
    parser.add_argument("--methods", help=f"comma-separated (default: {DEFAULT_METHODS}, and dps for inpainting or "
                        "with --dps-zeta)")
    parser.add_argument("--checkpoint", help="IDM model folder, training --out folder (its latest checkpoint) or a shipped model's name; its operator and prior are every method's, also when --methods leaves idm out (default: for idm, the shipped model serving the task and operator; without idm, none: the task's operator, and --prior for ddnm/dps)")
    parser.add_argument("--prior", help="diffusion prior for ddnm/dps: a folder or a shipped prior's name (default: the checkpoint's prior)")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    add_size_arg(parser, "test image")
    parser.add_argument("--color", choices=("gray", "y", "rgb"), help="colour mode of image files (default: the task's)")
    parser.add_argument("--ddnm-steps", type=int, help="DDNM sampling steps (default 100, as its authors)")
    parser.add_argument("--ddnm-eta", type=float, help="DDNM eta (default 0.85, as its authors)")
    parser.add_argument("--ddnm-pinv", choices=PINV_CHOICES,
                        help="A^+ of DDNM's projection: the operator's A_dagger, or least squares by conjugate "
                        "gradients; auto (default): least squares where A_dagger is approximate (ct's FBP)")
    parser.add_argument("--dps-steps", type=int, help="DPS steps (default 1000, as its authors)")
    parser.add_argument("--dps-zeta", help="DPS step size at the DPS authors' 3x256x256 image size, scaled to the "
                        "images' size: a number, or the JSON record of benchmarks.tune_dps (e.g. "
                        "benchmarks/results/cpu/dps-zeta-mri4x.json; checked against the task and operator; for "
                        "fastMRI .h5 files, tune with benchmarks.tune_dps --random-phase). "
                        "Default: the authors' value where they give one (inpainting)")
    parser.add_argument("--tv-lam", help="TV weight: a number, or the JSON record of benchmarks.tune_tv (checked "
                        "against the task and operator). Default: the task's (benchmarks.classical.TV_DEFAULTS)")
    parser.add_argument("--tv-iters", type=int, help="TV iterations (default: the task's, 800)")
    parser.add_argument("--no-images", action="store_true", help="no reconstructions or grids: only the tables and "
                        "tradeoff.png, which shows scores, not images")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--final-projection", action=argparse.BooleanOptionalAction, default=None,
                        help="run IDM with (or without) its output projected onto the measurements, x + A^+(y - A x), "
                        "whatever the model's config says (default: as the model was built; IDMConfig.final_projection)")
    add_precision_arg(parser, default="fp32")  # a benchmark measures one fixed thing on every machine
    add_ensemble_arg(parser, several=True)
    add_operator_args(parser)
    add_common_args(parser, out_help="output folder for results.csv, summary.md and pictures")
    parser.set_defaults(run=run)


def _load_checkpoint(args: argparse.Namespace, task: Any, overrides: dict[str, Any], device: torch.device,
                     img_size: tuple[int, int]):  # fmt: skip
    expect = {"name": task.operator, **overrides}
    request = {"name": task.operator, **task.operator_kwargs(**overrides)}
    return load_for_request(task, args.checkpoint, expect, request, device, overrides, img_size,
                            missing="method 'idm' needs --checkpoint: ")  # fmt: skip


def dps_clip_range(data: list[str], kspace: list[str]) -> tuple[float, float]:
    """The range DPS clamps its ``x0`` estimates to, in the image space: the signed range of the real and imaginary
    parts of complex images with a phase when ``data`` is fastMRI k-space (``kspace``: those of its paths that hold
    k-space files; :data:`benchmarks.dps.SIGNED_RANGE`), else the authors' [0, 1]. A ``ValueError`` when ``data``
    mixes the two, which would need both."""
    from benchmarks.dps import clip_range_for

    if kspace and len(kspace) < len(data):
        others = [path for path in data if path not in kspace]
        raise ValueError(f"dps: --data mixes k-space files ({kspace[0]}) with magnitude images ({others[0]}); DPS clamps "
                         "its estimates to [-1, 1] for the first (their phase makes the real and imaginary parts signed) "
                         "and to [0, 1] for the second: benchmark them in separate runs")  # fmt: skip
    return clip_range_for(bool(kspace))


def run(args: argparse.Namespace) -> int:
    from benchmarks import resident_memory
    from benchmarks.harness import RESULT_FIELDS, load_images, run_benchmark
    from benchmarks.idm_method import IDMMethod
    from benchmarks.methods import available_methods, make_method, needs_prior
    from benchmarks.prior import load_prior
    from benchmarks.protocol import describe_protocol, image_seed, operator_factory, pad_multiple, score_function
    from benchmarks.report import summary_table, write_results_csv
    from benchmarks.tune_dps import check_tuned_prior, phase_warning, step_size_from
    from benchmarks.tune_tv import lam_from
    from idm.hardware import hardware_name
    from idm.checkpoint import save_json
    from idm.cli.simulate import get_task
    from idm.export import exported_prior_fingerprint
    from idm.pretrain import prior_fingerprint
    from idm.shipped import find_prior
    from operators import without_size_and_seed
    from tasks.data import check_image_measurable, holds_kspace_files

    seed_everything(args.seed)
    folder = OutputFolder(args.out, "benchmark.json", "idm benchmark")
    folder.check()  # before any work
    device = resolve_device(args.device)
    resolve_precision_arg(args, device)
    task = get_task(task_name(args), task_color(args))
    overrides = operator_overrides(args)
    task.check_flags(**overrides)  # refuses flags the task does not take or would ignore, before any work
    if args.methods is None:
        args.methods = default_methods(task, args.dps_zeta)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = ["idm", *available_methods()]
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; available: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {args.methods}")
    if len(set(args.ensemble)) != len(args.ensemble):
        raise ValueError(f"--ensemble names a size twice: {' '.join(map(str, args.ensemble))}")
    if (args.ensemble != [1] or args.tall) and "idm" not in names:
        raise ValueError(f"{'--tall' if args.tall else '--ensemble'} sets how IDM runs, and --methods does not run idm")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    method_flags = {"tv": ("--tv-lam", "--tv-iters"), "ddnm": ("--ddnm-steps", "--ddnm-eta", "--ddnm-pinv"),
                    "dps": ("--dps-steps", "--dps-zeta")}  # fmt: skip
    for method, flags in method_flags.items():
        given = [flag for flag in flags if getattr(args, flag[2:].replace("-", "_")) is not None]
        if method not in names and given:
            raise ValueError(f"{' and '.join(given)} set the {method} baseline, which --methods does not run")
    for flag in ("tv_iters", "ddnm_steps", "dps_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")

    images = load_images(task, args.data, args.limit, args.seed, size=args.size)
    # the checkpoint (for idm, or for the operator and prior of the baselines alone)
    first_size = tuple(images[0].x.shape[-2:])
    trained = _load_checkpoint(args, task, overrides, device, first_size) if "idm" in names or args.checkpoint else None
    if trained is not None and args.final_projection is not None:
        trained.model.config = trained.model.config.replace(final_projection=args.final_projection)
    operator_for = operator_factory(task, overrides, None if trained is None else trained.operator, args.seed)
    first_op = operator_for(0, tuple(images[0].x.shape[-2:]))
    block = pad_multiple(task, first_op)  # the CS block the protocol pads to, else None
    for image in images:  # as idm simulate and idm reconstruct: before any method runs
        check_image_measurable(image.name, *image.x.shape[-2:], block=block)
    request = without_size_and_seed(first_op.config())  # tuning records are checked against what runs
    dps_zeta = None if args.dps_zeta is None else step_size_from(args.dps_zeta, task.name, request, _or(args.dps_steps, 1000))
    tv_lam = None if args.tv_lam is None else lam_from(args.tv_lam, task.name, request)
    prior = None
    if any(needs_prior(m) for m in names if m != "idm"):
        prior_path = args.prior
        if prior_path is None and trained is not None:
            prior_path = find_prior(trained.model.config.unet)
        if prior_path is None:
            recorded = None if trained is None else trained.model.config.unet
            where = (f"the checkpoint's prior {recorded!r} is not there (moved or deleted?); "
                     if recorded not in (None, "tiny", "sd15") else "")  # fmt: skip
            raise ValueError(f"ddnm and dps need a diffusion prior: {where}pass --prior DIR (e.g. an idm pretrain output)")
        prior = load_prior(prior_path, device=device)
    prior_sha256 = None if prior is None else prior_fingerprint(prior_path)  # which network DDNM and DPS run
    if args.dps_zeta is not None:
        check_tuned_prior(args.dps_zeta, prior_path, prior_sha256)

    options = {
        "ddnm": dict(steps=_or(args.ddnm_steps, 100), eta=_or(args.ddnm_eta, 0.85), pinv=_or(args.ddnm_pinv, "auto")),
        "dps": dict(steps=_or(args.dps_steps, 1000), zeta=dps_zeta),
        "tv": dict(lam=tv_lam, iters=args.tv_iters),
    }
    kspace = [path for path in args.data if holds_kspace_files(path)]  # real k-space: images with a phase
    if "dps" in names:
        options["dps"]["clip_range"] = dps_clip_range(args.data, kspace)
    methods = []
    for name in names:
        if name == "idm":
            methods += [IDMMethod(trained.model.to(device), precision=args.precision, ensemble=size, tall=args.tall)
                        for size in args.ensemble]  # fmt: skip
            continue
        extra = {"progress": not args.no_progress, **options.get(name, {})}
        methods.append(make_method(name, prior=prior, **extra))

    recorded_warnings = []  # shown now and kept in benchmark.json
    fine_tuned_from = ((trained.run or {}).get("settings") or {}).get("prior_sha256") if trained is not None else None
    if prior is not None and fine_tuned_from and fine_tuned_from not in (prior_sha256, exported_prior_fingerprint(prior_path)):
        recorded_warnings.append(f"the prior {str(prior_path)!r} is not the network {trained.path} was fine-tuned from "
                                 "(its files changed since, or --prior names another): DDNM and DPS run it, IDM "
                                 "its own")  # fmt: skip
    if trained is not None and task.size_bound:
        sizes = dict.fromkeys(tuple(im.x.shape[-2:]) for im in images)
        recorded_warnings += [warning for size in sizes if (warning := trained.size_warning(size))]
    if trained is not None and kspace and (warning := trained.phase_warning()):
        recorded_warnings.append(warning)
    if "dps" in names and args.dps_zeta is not None and (warning := phase_warning(args.dps_zeta, bool(kspace))):
        recorded_warnings.append(warning)  # a step tuned on crops of the other kind (with or without a phase)
    for warning in recorded_warnings:
        warnings.warn(warning, stacklevel=1)
    dps = next((m for m in methods if m.name == "dps"), None)
    tv = next((m for m in methods if m.name == "tv"), None)
    ddnm = next((m for m in methods if m.name == "ddnm"), None)
    if dps is not None:  # a clear error now if no step size is known for this operator; as run
        options["dps"]["zeta"] = dps.step_size(first_op)
    if tv is not None:  # as run: the task's defaults where no flag gave them
        options["tv"].update(zip(("lam", "iters"), tv.settings(first_op)))
    if ddnm is not None:
        options["ddnm"]["pinv"] = "operator" if ddnm.projection_operator(first_op) is first_op else "least-squares"

    command = command_line("benchmark")
    operator_seeded = "seed" in first_op.config()
    cpu_memory = resident_memory.measured_on(device)
    settings = {
        "command": command,
        "complete": True,
        "hardware": hardware_name(device),
        "task": task.describe(),
        "operator": without_size_and_seed(first_op.config()),
        "operator_seeds": f"{args.seed} + image index (mod 2**32)" if operator_seeded else None,
        "generator_seeds": f"{args.seed} + image index",
        "protocol": describe_protocol(task),
        "checkpoint": None if trained is None else str(trained.path),
        "idm_precision": args.precision,
        "idm_final_projection": None if trained is None else trained.model.config.final_projection,
        "idm_ensembles": args.ensemble if "idm" in names else None,
        "idm_tall": args.tall if "idm" in names else None,
        "prior": None if prior is None else str(prior_path),
        "prior_sha256": prior_sha256,
        "dps_zeta": None if dps is None else options["dps"]["zeta"],
        "tv_lam_iters": None if tv is None else [options["tv"]["lam"], options["tv"]["iters"]],
        "methods": [m.name for m in methods],  # as labelled in the tables (idm-x8: IDM ensembled over 8)
        "method_options": {name: options[name] for name in names if name in options},  # as run
        "images": [im.name for im in images],
        "inputs": [{**im.record(), "operator_seed": image_seed(args.seed, i) if operator_seeded else None}
                   for i, im in enumerate(images)],  # fmt: skip
        "limit": args.limit,
        "resized_to": args.size,
        "warnings": recorded_warnings,
        "peak_memory": ("peak_mem_mb: the method's peak CUDA allocation above what was allocated before its call"
                        if device.type == "cuda" else "peak_mem_mb: the pages the method's call first touched (its peak "
                        f"resident memory above the resident set before, freed heap handed back first), {torch.get_num_threads()} "
                        "thread(s); idm and pinv measured by an untimed call after the timed one"
                        if cpu_memory else None),  # fmt: skip
    }
    fields = [f for f in RESULT_FIELDS if f != "peak_mem_mb" or device.type == "cuda" or cpu_memory]
    out = folder.create()
    folder.start({"command": command, "complete": False})  # the folder is this command's from now on
    for table in ("results.csv", "summary.md", "tradeoff.png"):  # an earlier run's outputs, which this run's record would seem
        (out / table).unlink(missing_ok=True)  # to describe: its tables, and its pictures of other images or methods
    for pictures in ("grids", "recon"):
        shutil.rmtree(out / pictures, ignore_errors=True)
    scored: list[dict[str, Any]] = []

    def keep(rows: list[dict[str, Any]]) -> None:  # after every image: a run stopped part-way keeps its scores
        scored[:] = rows
        write_results_csv(rows, out / "results.csv", fields)

    try:
        rows = run_benchmark(
            images,
            methods,
            operator_for,
            score_function(task),
            display=lambda x: task.metric_image(x),
            device=device,
            out=None if args.no_images else out,
            seed=args.seed,
            pad_multiple=block,
            progress=not args.no_progress,
            after_image=keep,
        )
    except (Exception, KeyboardInterrupt) as error:
        if scored:
            reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
            done = list(dict.fromkeys(row["image"] for row in scored))
            save_json({**settings, "complete": False, "stopped_by": reason, "images_done": done}, out / "benchmark.json")
        folder.discard_if_empty()
        raise
    save_json(settings, out / "benchmark.json")
    summary = (
        f"# Benchmark: {task.name}\n\n`{command}`\n\nHardware: {settings['hardware']}. "
        f"Operator: {settings['operator']}. Protocol: {settings['protocol']}. "
        f"{len(images)} image(s)"
        + (f", resized to {args.size}x{args.size}" if args.size else "")
        + f"; seeds: operators and generators {args.seed} + image index"
        + (f"; DPS step size {settings['dps_zeta']} (at 3x256x256, scaled to the image size), x0 clamped to "
           f"{list(options['dps']['clip_range'])}" if dps is not None else "")
        + (f"; TV weight {settings['tv_lam_iters'][0]}, {settings['tv_lam_iters'][1]} iterations" if tv is not None else "")
        + (f"; IDM in {args.precision}" if trained is not None else "")
        + ("; IDM output projected onto the measurements" if settings["idm_final_projection"] else "")
        + ".\n\n"
        + summary_table(rows, [m.name for m in methods])
        + "\n"
        + "".join(f"\nWarning: {warning}\n" for warning in recorded_warnings)
    )
    (out / "summary.md").write_text(summary)
    print(summary)
    _plot_tradeoff(rows, [m.name for m in methods], out / "tradeoff.png", f"{command}\non {settings['hardware']}")
    failures = sum(1 for r in rows if r["status"] != "ok")
    if failures:
        print(f"{failures} reconstruction(s) failed; see the error column of {out / 'results.csv'}", file=sys.stderr)
    return 1 if rows and failures == len(rows) else 0  # some results: 0; nothing scored: a failure


def _plot_tradeoff(rows: list[dict[str, Any]], methods: list[str], path, title: str) -> None:
    """``OUT/tradeoff.png`` (:mod:`benchmarks.tradeoff`) of the methods that scored an image, in ``methods``'
    order, over the images they all scored; none when no method scored one."""
    from benchmarks.tradeoff import method_points, save_tradeoff_plot

    try:
        points = method_points(rows)  # every method with a scored image
    except ValueError as error:
        if any(r["status"] == "ok" for r in rows):  # else nothing scored: the run's failure says why
            print(f"no tradeoff.png: {error}", file=sys.stderr)
        return
    save_tradeoff_plot(sorted(points, key=lambda point: methods.index(point.method)), path, title)


def _or(value: Any, default: Any) -> Any:
    """A flag's value, or its default where it was not given (``None``)."""
    return default if value is None else value
