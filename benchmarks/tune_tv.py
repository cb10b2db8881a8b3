"""Tune the TV baseline's weight ``lam`` for a task on training crops, and record it.

    python -m benchmarks.tune_tv --task mri --acceleration 4 --data ../shared/data/mri/train/ChestTrain \\
        --crop 256 --images 4 --out benchmarks/results/cpu/tv-lam-mri4x.json

:func:`benchmarks.classical.tune_tv_weight` runs TV with every ``lam`` of
the grid (``--iters`` outer iterations each, a fixed budget: small weights
converge slowly, so the choice is "best at this budget") on noise-free
measurements of a few random training crops (never test images), and keeps
the best mean PSNR, measured as ``idm benchmark`` scores the task
(:mod:`benchmarks.tuning`). :data:`benchmarks.classical.TV_DEFAULTS` holds
the values chosen so; ``idm benchmark --tv-lam`` takes another.
"""

from __future__ import annotations

import time

from benchmarks.classical import DEFAULT_LAM_GRID, tune_tv_weight
from benchmarks.report import run_script
from benchmarks.tuning import tuned_value, tuning_parser, tuning_setup
from idm.checkpoint import save_json
from idm.cli.common import positive_int


def lam_from(text: str, task_name: str, operator: dict) -> float:
    """``idm benchmark --tv-lam``: a number, or the JSON record this script writes (its ``lam``),
    checked against the benchmark's task and operator (:func:`benchmarks.tuning.tuned_value`)."""
    return tuned_value(text, task_name, operator, "lam", "--tv-lam", "benchmarks.tune_tv", "TV weight record")


def main(argv: list[str] | None = None) -> int:
    parser = tuning_parser(__doc__, crop=128, images=4)
    parser.add_argument("--iters", type=positive_int, default=400, help="TV iterations per candidate")
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_LAM_GRID))
    args = parser.parse_args(argv)
    setup = tuning_setup(args, parser)
    start = time.perf_counter()
    best, scores = tune_tv_weight(setup.op, setup.images, grid=args.grid, iters=args.iters, return_scores=True,
                                  score=setup.score, progress=not args.no_progress)  # fmt: skip
    record = setup.record("benchmarks.tune_tv", argv, time.perf_counter() - start, iters=args.iters,
                          mean_psnr_by_lam={str(v): round(s, 3) for v, s in scores.items()}, lam=best)  # fmt: skip
    save_json(record, args.out)
    print(f"TV lam for {setup.task.name} {record['operator']}: {best} (mean PSNR by lam: {record['mean_psnr_by_lam']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.tune_tv"))
