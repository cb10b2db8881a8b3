"""Where an IDM's time goes: operator totals of one inference call or one training iteration.

    python -m benchmarks.kernel_profile --device cuda --unet sd15 --size 256 --steps 3 --batch 16 \\
        --precision bf16 --mode inference train --out benchmarks/results/h200/kernel-profile

Runs ``torch.profiler`` over one call after ``--warmup`` untimed ones and
writes, per mode, the operators with the most self time on the device
(the GPU's kernels on CUDA, the CPU's own time on the CPU) and the sum over
kinds (attention, convolution, matrix products, normalisation, the rest).
It also gives the wall time of the profiled call beside the device's busy
time: when the device is busy for much less than the wall time, the call
is bound by the host launching kernels, not by the kernels.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.report import script_command
from benchmarks.speed import build_model
from benchmarks.timing import TrainingSetup, add_timing_args, seconds_of, setup, sync
from idm.hardware import hardware_name
from idm.precision import PRECISIONS

KINDS = {  # substrings of operator names, first match wins
    "attention": ("attention", "flash", "softmax", "fmha", "sdpa"),
    "convolution": ("conv", "cudnn", "fprop", "dgrad", "wgrad", "implicit"),
    "matrix products": ("mm", "gemm", "linear", "matmul"),
    "normalisation": ("norm", "moments"),
}


def kind_of(name: str) -> str:
    """The kind an operator's name belongs to (``"other"`` when none of :data:`KINDS` matches)."""
    lowered = name.lower()
    return next((kind for kind, keys in KINDS.items() if any(key in lowered for key in keys)), "other")


def profile_call(run, device: torch.device, warmup: int) -> tuple[float, list[tuple[str, float, int]]]:
    """``(wall seconds, [(operator, self device seconds, calls), ...] most first)`` of one ``run()``."""
    for _ in range(warmup):
        run()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = seconds_of(run, device)
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0:
            rows.append((event.key, us / 1e6, event.count))
    rows.sort(key=lambda row: -row[1])
    return wall, rows


def report(mode: str, wall: float, rows: list[tuple[str, float, int]], top: int) -> str:
    """A markdown section: busy vs wall time, totals by kind, the ``top`` operators."""
    busy = sum(seconds for _, seconds, _ in rows)
    by_kind: dict[str, float] = defaultdict(float)
    for name, seconds, _ in rows:
        by_kind[kind_of(name)] += seconds
    lines = [f"### {mode}", "", f"wall {1000 * wall:.1f} ms; device busy {1000 * busy:.1f} ms "
             f"({100 * busy / wall:.0f} % of the wall time)", "", "| kind | ms | share of busy |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {kind} | {1000 * s:.1f} | {100 * s / busy:.1f} % |" for kind, s in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines += ["", "| operator | ms | calls | share of busy |", "|---|---|---|---|"]
    lines += [f"| `{name[:90]}` | {1000 * s:.2f} | {n} | {100 * s / busy:.1f} % |" for name, s, n in rows[:top]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(parser, "benchmarks/results/kernel-profile", iters=1, warmup=2)
    parser.add_argument("--unet", default="sd15", help="tiny, sd15 or a diffusers U-Net folder (random weights)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--variant", choices=("none", "both"), default="both", help="training: plain or memory-saving backward")
    parser.add_argument("--mode", nargs="+", choices=("inference", "train"), default=["inference"])
    parser.add_argument("--top", type=int, default=25, help="operators listed per mode")
    args = parser.parse_args(argv)
    device, out = setup(args)
    sections = []
    for mode in args.mode:
        model, _, op = build_model(args.unet, None, args.steps, "both" if mode == "inference" else args.variant, args.size, device)
        if mode == "inference":
            x = torch.rand(args.batch, 1, args.size, args.size, device=device)
            y = op.A(x)
            model.eval()
            model.inference_precision = args.precision  # as benchmarks.speed times it

            def run(model=model, y=y, op=op) -> None:
                with torch.no_grad():
                    model(y, op)

            label = f"inference, batch {args.batch}"
        else:
            run = TrainingSetup.for_model(model, op, args.batch, args.size, args.precision, lr=1e-6).iteration
            label = f"training iteration ({args.variant}), batch {args.batch}"
        wall, rows = profile_call(run, device, args.warmup)
        sections.append(report(label, wall, rows, args.top))
        print(sections[-1], flush=True)
        del model, run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    command = script_command("benchmarks.kernel_profile", argv)
    text = f"`{command}` on {hardware_name(device)}, {args.precision}, T={args.steps}, {args.size}x{args.size}\n\n" + "\n".join(sections)
    (out / "kernel_profile.md").write_text(text)
    print(f"wrote {out / 'kernel_profile.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
