"""Tune DPS's step size ``zeta`` for a task once, on training crops, and record it.

    python -m benchmarks.tune_dps --task cs --ratio 0.1 --prior idm/weights/prior-natural-y \\
        --data ../shared/data/natural/train/BSDS400 --crop 64 --images 4 --out benchmarks/results/cpu/dps-zeta-cs10.json

The DPS authors give ``zeta`` for inpainting, super-resolution and deblurring
only; for other tasks :func:`benchmarks.dps.tune_dps_step` tries a grid on a
few random training crops (never test images) with the full 1000 steps and
keeps the best mean PSNR, measured as ``idm benchmark`` scores the task
(:mod:`benchmarks.tuning`). The JSON records the task, operator, prior, images,
grid scores and the choice; pass it on as ``idm benchmark --dps-zeta``.

Small crops keep the search affordable on a CPU. ``zeta`` is read at the
DPS authors' image size (3 x 256 x 256) and scaled to the crops
(:func:`benchmarks.dps.size_scaled_step`: each pixel moves as far as on the
authors' images), so the chosen value carries over to full-size images.

For real MRI k-space, tune on crops given a random phase (``--random-phase``,
as ``idm train`` gives them): DPS then clamps its ``x0`` estimates to the
signed range of their real and imaginary parts, as ``idm benchmark`` does
on k-space files (:data:`benchmarks.dps.SIGNED_RANGE`).
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.dps import DEFAULT_STEP_GRID, clip_range_for, tune_dps_step
from benchmarks.prior import load_prior
from benchmarks.report import run_script
from benchmarks.tuning import is_number, tuned_value, tuning_parser, tuning_setup
from idm.checkpoint import load_json, save_json
from idm.cli.common import positive_int
from idm.pretrain import prior_fingerprint

#: What messages call the JSON record this script writes.
RECORD = "DPS step-size record"


def step_size_from(text: str, task_name: str, operator: dict, steps: int | None = None) -> float:
    """``idm benchmark --dps-zeta``: a number, or the JSON record this script writes (its ``zeta``),
    checked against the benchmark's task and operator and, given, DPS's ``steps``
    (:func:`benchmarks.tuning.tuned_value`)."""
    run = None if steps is None else {"steps": steps}
    return tuned_value(text, task_name, operator, "zeta", "--dps-zeta", "benchmarks.tune_dps", RECORD, run)


def check_tuned_prior(text: str, prior: str | Path, fingerprint: str | None = None) -> None:
    """A ``ValueError`` when ``--dps-zeta``'s record (``text``; a number passes) was tuned with another prior than
    ``prior``: another network by :func:`idm.pretrain.prior_fingerprint` (recorded since it exists, else
    computed from the recorded path where that exists here; a record whose prior is not here is not checked).
    ``fingerprint``: ``prior``'s, when the caller has it already."""
    if is_number(text):
        return
    record = load_json(text, RECORD)  # step_size_from has checked that it is a record with a zeta
    tuned = record.get("prior_sha256")
    if tuned is None and record.get("prior"):
        try:
            tuned = prior_fingerprint(record["prior"])
        except (OSError, ValueError):  # tuned on another machine: nothing to compare with here
            return
    if tuned is not None and tuned != (fingerprint or prior_fingerprint(prior)):
        raise ValueError(f"--dps-zeta {text}: tuned with the prior {record.get('prior')!r}, another network than "
                         f"{str(prior)!r}; pass --dps-zeta {record['zeta']} to use it anyway")  # fmt: skip


def phase_warning(text: str, with_phase: bool) -> str | None:
    """A warning when ``--dps-zeta``'s record (``text``; a number passes) was tuned on crops of the other kind
    than the benchmark's images (``with_phase``: k-space files, whose images have a phase; else magnitude
    images): without a phase for the first, or with one for the second."""
    if is_number(text):
        return None
    record = load_json(text, RECORD)
    tuned_with_phase = bool(record.get("random_phase"))  # records before --random-phase tuned without one
    if tuned_with_phase == with_phase:
        return None
    if with_phase:
        return (f"--dps-zeta {text} was tuned on crops without a phase, these are k-space files whose images have one: "
                "tune DPS's step for them with python -m benchmarks.tune_dps --random-phase")  # fmt: skip
    return f"--dps-zeta {text} was tuned on crops with a random phase, these are magnitude images without one"


def main(argv: list[str] | None = None) -> int:
    parser = tuning_parser(__doc__, crop=64, images=4)
    parser.add_argument("--prior", required=True, help="diffusers UNet2DModel folder (an idm pretrain prior)")
    parser.add_argument("--steps", type=positive_int, default=1000)
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_STEP_GRID))
    args = parser.parse_args(argv)
    setup = tuning_setup(args, parser)
    try:
        prior = load_prior(args.prior, device=setup.device)
    except ValueError as err:  # PriorError: not a prior folder
        parser.error(str(err))
    start = time.perf_counter()
    clip_range = clip_range_for(setup.signed)
    best, scores = tune_dps_step(prior, setup.op, setup.images, grid=args.grid, steps=args.steps, seed=args.seed,
                                 return_scores=True, score=setup.score, progress=not args.no_progress,
                                 clip_range=clip_range)  # fmt: skip
    record = setup.record(
        "benchmarks.tune_dps", argv, time.perf_counter() - start,
        prior=args.prior,
        prior_sha256=prior_fingerprint(args.prior),
        steps=args.steps,
        clip_range=list(clip_range),
        mean_psnr_by_zeta={str(z): round(s, 3) for z, s in scores.items()},
        zeta=best,
        zeta_units="step size at the DPS authors' 3x256x256 image size; DPS scales it by sqrt(values per image / 196608)",
    )  # fmt: skip
    save_json(record, args.out)
    print(f"DPS zeta for {setup.task.name} {record['operator']}: {best} (mean PSNR by zeta: {record['mean_psnr_by_zeta']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.tune_dps"))
