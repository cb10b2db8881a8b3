"""Tune DPS's step size ``zeta`` for a task once, on training crops, and record it.

    python -m benchmarks.tune_dps --task cs --ratio 0.1 --prior idm/weights/prior-natural-y \\
        --data ../shared/data/natural/train/BSDS400 --crop 64 --images 4 --out benchmarks/results/dps-zeta-cs10.json

The DPS authors give ``zeta`` for inpainting, super-resolution and deblurring
only; for other tasks :func:`benchmarks.dps.tune_dps_step` tries a grid on a
few random training crops (never test images) with the full 1000 steps and
keeps the best mean PSNR. The JSON records the task, operator, prior, images,
grid scores and the choice; pass it on as ``idm benchmark --dps-zeta``.

Small crops keep the search affordable on a CPU. ``zeta`` is read at the
DPS authors' image size (3 x 256 x 256) and scaled to the crops
(:func:`benchmarks.dps.size_scaled_step`: each pixel moves as far as on the
authors' images), so the chosen value carries over to full-size images.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.dps import DEFAULT_STEP_GRID, tune_dps_step
from benchmarks.prior import load_prior
from benchmarks.report import script_command
from idm.checkpoint import load_json, save_json
from idm.hardware import hardware_name


def step_size_from(text: str, task_name: str, operator: dict) -> float:
    """``idm benchmark --dps-zeta``: a number, or the JSON record this script writes (its ``zeta``).

    A record is checked against the benchmark's task and operator settings
    (those both name); a mismatch is a ``ValueError`` that says to pass the
    number instead, to use that value anyway.
    """
    try:
        return float(text)
    except ValueError:
        pass
    record = load_json(text, "DPS step-size record")
    if not isinstance(record, dict) or "zeta" not in record or "task" not in record:
        raise ValueError(f"--dps-zeta {text}: not a number, nor a record of benchmarks.tune_dps (no 'task' / 'zeta')")
    if record["task"] != task_name:
        raise ValueError(f"--dps-zeta {text}: tuned for task {record['task']!r}, this benchmark is {task_name!r}")
    tuned = record.get("operator", {})
    differ = sorted(k for k in set(tuned) & set(operator) if tuned[k] != operator[k])
    if differ:
        settings = ", ".join(f"{k} {tuned[k]} (here {operator[k]})" for k in differ)
        raise ValueError(f"--dps-zeta {text}: tuned with {settings}; pass --dps-zeta {record['zeta']} to use it anyway")
    return float(record["zeta"])


def main(argv: list[str] | None = None) -> int:
    import tasks
    from idm.cli.common import add_operator_args, operator_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--color", choices=("gray", "y", "rgb"))
    parser.add_argument("--prior", required=True, help="diffusers UNet2DModel folder (an idm pretrain prior)")
    parser.add_argument("--data", nargs="+", required=True, help="TRAINING images (never the test set)")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_STEP_GRID))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file to write")
    add_operator_args(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    task = tasks.get(args.task)
    if args.color:
        task = task.with_color(args.color)
    overrides = operator_overrides(args)
    dataset = task.dataset(args.data, crop=args.crop, augment=False, seed=args.seed)
    torch.manual_seed(args.seed)
    picks = torch.randperm(len(dataset))[: args.images].tolist()
    images = torch.stack([dataset[i] for i in picks]).to(device)
    op = task.make_operator(args.crop, seed=args.seed, **overrides)
    prior = load_prior(args.prior, device=device)
    start = time.perf_counter()
    best, scores = tune_dps_step(prior, op, images, grid=args.grid, steps=args.steps, seed=args.seed, return_scores=True)
    record = {
        "command": script_command("benchmarks.tune_dps", argv),
        "hardware": hardware_name(device),
        "seconds": round(time.perf_counter() - start, 1),
        "task": task.name,
        "operator": {k: v for k, v in op.config().items() if k not in ("img_size", "seed")},
        "prior": args.prior,
        "images": [getattr(dataset, "item_name", str)(i) for i in picks],
        "crop": args.crop,
        "steps": args.steps,
        "mean_psnr_by_zeta": {str(z): round(s, 3) for z, s in scores.items()},
        "zeta": best,
        "zeta_units": "step size at the DPS authors' 3x256x256 image size; DPS scales it by sqrt(values per image / 196608)",
    }
    save_json(record, args.out)
    print(f"DPS zeta for {task.name} {record['operator']}: {best} (mean PSNR by zeta: {record['mean_psnr_by_zeta']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
