"""The paper's ablation (Table 5) at the scale these machines allow.

    python -m benchmarks.ablation --task cs --ratio 0.1 --prior runs/prior \\
        --train-data data/natural/train/Train400 --test-data data/natural/test/Set11 \\
        --steps 2 --iters 2000 --batch-size 8 --crop 128 --device cuda --out benchmarks/results/ablation

Every variant is trained with the same budget, data, operator draws and seed,
then scored on the same test images (``idm benchmark``'s protocol). The
progression follows the paper's rows (1) -> (3) -> (5)/(4) -> (6) -> (7), plus
the initialisation comparison (8) vs (9):

==================  =====================================================================
``ddnm``            no end-to-end training: the prior as DDNM (100 steps)        (1)/(2)
``e2e_scratch``     end-to-end, plain network, random weights (no reuse)          (3)
``e2e``             end-to-end, plain network, prior weights (reuse)              (5)
``e2e_inv``         + two-level invertibility (wiring, memory-saving backward)    (6)
``idm``             + injectors: the full method                                  (7)/(9)
``idm_noise_init``  the full method started from noise instead of sqrt(abar) A^+ y (8)
==================  =====================================================================

Writes ``OUT/ablation.csv`` and ``OUT/ablation.md`` (PSNR, SSIM, training
time and memory, NFEs, inference time per image).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from benchmarks.experiments import Variant, run_variant
from benchmarks.harness import load_images
from benchmarks.report import run_script, script_command, write_csv_and_markdown
from idm import IDMConfig
from idm.cli.common import positive_int, resolve_device, seed_value
from idm.hardware import hardware_name
from idm.train import TrainConfig

VARIANTS = (
    Variant("ddnm", end_to_end=False, description="prior as DDNM, no training"),
    # the plain network with plain autograd (recompute=True would checkpoint each step: not the paper's variant)
    Variant("e2e_scratch", dict(invertible="none", injectors=False, recompute=False), random_init=True,
            description="E2E, random init"),
    Variant("e2e", dict(invertible="none", injectors=False, recompute=False), description="E2E, reused prior"),
    Variant("e2e_inv", dict(invertible="both", injectors=False), description="+ two-level invertibility"),
    Variant("idm", dict(invertible="both", injectors=True), description="+ injectors (full IDM)"),
    Variant("idm_noise_init", dict(invertible="both", injectors=True, init="noise"), description="full IDM, noise init"),
)
FIELDS = ["variant", "description", "psnr", "ssim", "train_seconds", "train_memory_mb", "iterations", "nfe",
          "inference_seconds", "test_images", "status", "error"]


def refuse_earlier_runs(parser: argparse.ArgumentParser, out: Path, names: Iterable[str]) -> None:
    """Exit with status 2 (``parser.error``), before any work, when ``out`` holds the training run of one of the
    variants ``names`` (``OUT/NAME/run``): that variant would fail, and the table be rewritten without its scores."""
    taken = [name for name in names if (out / name / "run").exists()]
    if taken:
        parser.error(f"--out {str(out)!r} holds the training runs of {', '.join(taken)} from an earlier run: choose "
                     "another --out, or move them away (nothing was overwritten)")


def add_experiment_args(parser: argparse.ArgumentParser, training_required: bool = True) -> None:
    """Options shared by the ablation and scaling scripts (``--prior``/``--train-data`` optional if not ``training_required``)."""
    parser.add_argument("--task", default="cs")
    parser.add_argument("--prior", required=training_required, help="diffusion prior folder (idm pretrain output)")
    parser.add_argument("--train-data", nargs="+", required=training_required)
    parser.add_argument("--test-data", nargs="+", required=True)
    parser.add_argument("--limit", type=positive_int, help="test images used (default: all)")
    parser.add_argument("--steps", type=positive_int, default=2, help="T (the paper's ablation uses 2)")
    parser.add_argument("--iters", type=positive_int, default=2000, help="training iterations per variant")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--crop", type=positive_int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--scalar-lr-mult", type=float, default=1.0)
    parser.add_argument("--ddnm-steps", type=positive_int, default=100)
    parser.add_argument("--ratio", type=float, help="operator flag (see idm train)")
    parser.add_argument("--views", type=positive_int, help="operator flag (ct)")
    parser.add_argument("--acceleration", type=float, help="operator flag (mri)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--out", required=True)


def experiment_setup(args: argparse.Namespace):
    """``(task, overrides, images, base model config, budget, device)`` from the shared options."""
    import tasks

    from idm.pretrain import prior_folder

    task = tasks.get(args.task)
    overrides = {k: getattr(args, k) for k in ("ratio", "views", "acceleration") if getattr(args, k, None) is not None}
    # a flag the task does not take, or a value its operator refuses at the training crop
    task.check_operator_settings((args.crop, args.crop), **overrides)
    device = resolve_device(args.device)
    for folder in args.train_data or []:
        if not Path(folder).exists():
            raise ValueError(f"--train-data {folder}: no such file or folder")
    if args.prior is not None:
        args.prior = prior_folder(args.prior)  # a pretrain run stands for its prior, a shipped prior's name for its folder
        if not Path(args.prior).is_dir():
            raise ValueError(f"--prior {args.prior}: no such folder, nor a shipped prior's name")
    images = load_images(task, args.test_data, args.limit, args.seed)
    base = IDMConfig(unet=args.prior, steps=args.steps, **task.model_defaults())  # as `idm train` builds it
    budget = TrainConfig(iters=args.iters, batch_size=args.batch_size, lr=args.lr, scalar_lr_mult=args.scalar_lr_mult,
                         seed=args.seed, checkpoint_every=args.iters, progress=False)
    return task, overrides, images, base, budget, device


def write_table(rows: list[dict], fields: list[str], out: Path, stem: str, header: str) -> str:
    """``OUT/STEM.csv`` and ``OUT/STEM.md`` (printed); returns the markdown."""

    def cell(value) -> str:
        if value is None or value == "":
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    shown = [f for f in fields if f not in ("error", "description", "status")]
    lines = [header, "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(f)) for f in shown) + " |")
    failed = [r for r in rows if r.get("status") != "ok"]
    lines += [""] + [f"- `{r[shown[0]]}` failed: {r.get('error')}" for r in failed]
    text = "\n".join(lines) + "\n"
    write_csv_and_markdown(out, stem, rows, fields, text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_experiment_args(parser)
    parser.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS], choices=[v.name for v in VARIANTS])
    args = parser.parse_args(argv)
    refuse_earlier_runs(parser, Path(args.out), args.variants)
    task, overrides, images, base, budget, device = experiment_setup(args)
    out = Path(args.out)
    rows = []
    for variant in (v for v in VARIANTS if v.name in args.variants):
        print(f"ablation: {variant.name} ({variant.description})", flush=True)
        try:
            row = run_variant(variant, task=task, prior=args.prior, train_data=args.train_data, images=images,
                              overrides=overrides, base_model=base, budget=budget, crop=args.crop, out=out,
                              device=device, ddnm_options={"steps": args.ddnm_steps})
            row["status"] = "ok"
        except Exception as err:  # noqa: BLE001 -- record and go on with the other variants
            row = {"variant": variant.name, "description": variant.description, "status": "error",
                   "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        print("  " + ", ".join(f"{k}={row.get(k)}" for k in ("psnr", "train_seconds", "train_memory_mb", "status")), flush=True)
    command = script_command("benchmarks.ablation", argv)
    header = f"`{command}` on {hardware_name(device)}; T={args.steps}, {args.iters} iterations per variant, batch {args.batch_size}, crop {args.crop}."
    write_table(rows, FIELDS, out, "ablation", header)
    return all_failed_status(rows)


def all_failed_status(rows: list[dict]) -> int:
    """The exit status of a run of rows: 1 when every row failed (their errors are in the table), else 0."""
    if rows and all(r.get("status") != "ok" for r in rows):
        print("every row failed (the errors are listed above and in the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.ablation"))
