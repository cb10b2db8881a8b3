"""PSNR vs CS ratio and PSNR vs T (paper Fig. 10), as tables and PNG plots.

    python -m benchmarks.scaling --sweep steps --values 1 2 3 4 6 --prior runs/prior \\
        --train-data data/natural/train/Train400 --test-data data/natural/test/Set11 \\
        --ratio 0.1 --iters 2000 --device cuda --out benchmarks/results/scaling
    python -m benchmarks.scaling --sweep ratio --values 0.01 0.04 0.1 0.25 0.3 0.5 ... (same options)

    python -m benchmarks.scaling --sweep ratio --values 0.01 0.04 0.1 0.25 0.5 --checkpoint cs-ratio-1-50 \\
        --test-data data/natural/test/Set11 --out benchmarks/results/scaling-shipped

Each value trains the full IDM (two-level invertible, injectors, pinv
initialisation) with the same budget and scores it on the test images.
With ``--checkpoint`` (a trained IDM folder or a shipped model's name, for
``--sweep ratio`` only) nothing is trained: the one model, trained on a
range of ratios, is scored at every value. Writes
``OUT/scaling_<sweep>.csv``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.ablation import add_experiment_args, all_failed_status, experiment_setup, refuse_earlier_runs, write_table
from benchmarks.experiments import Variant, run_variant
from benchmarks.report import run_script, script_command
from idm.cli.common import resolve_device
from idm.hardware import hardware_name

FIELDS = ["value", "psnr", "ssim", "train_seconds", "train_memory_mb", "iterations", "nfe", "inference_seconds",
          "test_images", "status", "error"]


def plot(rows: list[dict], sweep: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["value"] for r in ok], [r["psnr"] for r in ok], "o-")
    ax.set(xlabel="CS ratio" if sweep == "ratio" else "T (sampling steps)", ylabel="PSNR (dB)", title=f"IDM: PSNR vs {sweep}")
    ax.grid(alpha=0.3)
    if sweep == "steps":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # T is a count
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_experiment_args(parser, training_required=False)
    parser.add_argument("--sweep", choices=("ratio", "steps"), required=True)
    parser.add_argument("--values", nargs="+", type=float, required=True)
    parser.add_argument("--checkpoint", help="score this trained IDM at every ratio instead of training one per value")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and args.sweep != "ratio":
        parser.error("--checkpoint scores one model at several ratios: it needs --sweep ratio")
    if args.checkpoint is None and not (args.prior and args.train_data):
        parser.error("--prior and --train-data are needed to train one model per value (or give --checkpoint)")
    out = Path(args.out)
    if args.checkpoint is None:
        refuse_earlier_runs(parser, out, [f"{args.sweep}_{value:g}" for value in args.values])
    rows = score_checkpoint(args) if args.checkpoint is not None else train_per_value(args, out)
    command = script_command("benchmarks.scaling", argv)
    device = torch.device(args.device)
    budget = (f"the trained model {args.checkpoint}, no training" if args.checkpoint is not None else
              f"{args.iters} iterations per value, batch {args.batch_size}, crop {args.crop}")
    header = f"`{command}` on {hardware_name(device)}; {budget}."
    write_table(rows, FIELDS, out, f"scaling_{args.sweep}", header)
    plot(rows, args.sweep, out / f"scaling_{args.sweep}.png")
    return all_failed_status(rows)


def score_checkpoint(args: argparse.Namespace) -> list[dict]:
    """One row per ratio: the trained model ``args.checkpoint`` scored on the test images."""
    import tasks
    from benchmarks.experiments import evaluate
    from benchmarks.harness import load_images
    from benchmarks.idm_method import IDMMethod
    from idm.train import load_trained
    from operators.family import config_mismatches

    task = tasks.get(args.task)
    device = resolve_device(args.device)
    trained = load_trained(args.checkpoint, expect_task=task.name, device=device)
    images = load_images(task, args.test_data, args.limit, args.seed)
    recorded = trained.recorded_operator  # None for a bare model folder: nothing to check against
    outside = {value: config_mismatches(recorded, {"ratio": value}) if recorded else [] for value in args.values}
    outside = {value: problems for value, problems in outside.items() if problems}
    if outside:
        raise ValueError(f"{args.checkpoint} was not trained for every ratio asked: "
                         + "; ".join(f"{value:g}: {', '.join(problems)}" for value, problems in outside.items()))  # fmt: skip
    method = IDMMethod(trained.model.to(device))
    rows = []
    for value in args.values:
        print(f"scaling: ratio = {value:g} ({args.checkpoint})", flush=True)
        try:
            row = evaluate(method, task, images, trained.operator, {"ratio": value}, device, args.seed)
            row.update(status="ok", iterations=0)
        except Exception as err:  # noqa: BLE001 -- record and go on with the other values
            row = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        row["value"] = value
        rows.append(row)
    return rows


def train_per_value(args: argparse.Namespace, out: Path) -> list[dict]:
    """One row per value: a model trained with the shared budget, then scored."""
    rows = []
    for value in args.values:
        if args.sweep == "steps":
            args.steps = int(value)
        else:
            args.ratio = value
        task, overrides, images, base, budget, device = experiment_setup(args)
        variant = Variant(f"{args.sweep}_{value:g}")
        print(f"scaling: {args.sweep} = {value:g}", flush=True)
        try:
            row = run_variant(variant, task=task, prior=args.prior, train_data=args.train_data, images=images,
                              overrides=overrides, base_model=base, budget=budget, crop=args.crop, out=out, device=device)
            row["status"] = "ok"
        except Exception as err:  # noqa: BLE001 -- record and go on with the other values
            row = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        row["value"] = int(value) if args.sweep == "steps" else value
        rows.append(row)
    return rows


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.scaling"))
