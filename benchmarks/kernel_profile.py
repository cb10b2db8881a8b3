"""Where an IDM's time goes: operator totals of one inference call or one training iteration.

    python -m benchmarks.kernel_profile --device cuda --unet sd15 --size 256 --steps 3 --batch 16 \\
        --train-batch 8 --train-variants none both both-attention-kept --precision bf16 --mode inference train \\
        --out benchmarks/results/h200/kernel-profile

Runs ``torch.profiler`` over ``--iters`` calls (default 1) after ``--warmup``
untimed ones and writes, per call and mode, the operators with the most self time on the device
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
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.memory import ABLATIONS
from benchmarks.report import run_script, script_command
from benchmarks.speed import build_model
from benchmarks.timing import TrainingSetup, add_timing_args, seconds_of, setup, sync
from idm.cli.common import positive_int
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


HOST_STALL = "Command Buffer Full"  # CUPTI's record of the host waiting for room in the launch queue


def profile_call(run, device: torch.device, warmup: int, calls: int = 1) -> tuple[float, float, list[tuple[str, float, float]]]:
    """``(wall seconds, host-stall seconds, [(operator, self device seconds, calls), ...] most first)`` of
    one ``run()``, averaged over ``calls`` profiled calls.

    On CUDA the operators are the device's own events (kernels, copies): a CPU operator's "self device
    time" repeats the time of the kernels it launched, so counting both would count that time twice.
    The host's stalls on a full launch queue (:data:`HOST_STALL`) are returned apart: they mean the
    device, not the host, set the pace.
    """
    for _ in range(warmup):
        run()
    sync(device)
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        wall = sum(seconds_of(run, device) for _ in range(calls)) / calls
    rows, stalled = [], 0.0
    for event in prof.key_averages():
        if event.key == HOST_STALL:
            stalled += max(event.self_device_time_total, event.self_cpu_time_total) / 1e6 / calls
            continue
        if on_cuda and event.device_type != DeviceType.CUDA:
            continue
        us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if us > 0:
            rows.append((event.key, us / 1e6 / calls, event.count / calls))
    rows.sort(key=lambda row: -row[1])
    return wall, stalled, rows


def report(mode: str, wall: float, stalled: float, rows: list[tuple[str, float, float]], top: int) -> str:
    """A markdown section: busy vs wall time, host stalls, totals by kind, the ``top`` operators."""
    busy = sum(seconds for _, seconds, _ in rows)
    by_kind: dict[str, float] = defaultdict(float)
    for name, seconds, _ in rows:
        by_kind[kind_of(name)] += seconds
    lines = [f"### {mode}", "", f"wall {1000 * wall:.1f} ms; device busy {1000 * busy:.1f} ms "
             f"({100 * busy / wall:.0f} % of the wall time); host stalled on a full launch queue {1000 * stalled:.1f} ms", "", "| kind | ms | share of busy |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {kind} | {1000 * s:.1f} | {100 * s / busy:.1f} % |" for kind, s in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines += ["", "| operator | ms | calls | share of busy |", "|---|---|---|---|"]
    lines += [f"| `{name[:90]}` | {1000 * s:.2f} | {n:g} | {100 * s / busy:.1f} % |" for name, s, n in rows[:top]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(parser, iters=1, warmup=2)
    parser.add_argument("--unet", default="sd15", help="tiny, sd15 or a diffusers U-Net folder (random weights)")
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--batch", type=positive_int, default=16, help="inference batch")
    parser.add_argument("--train-batch", type=positive_int, default=8)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--train-variants", nargs="+", choices=("none", "both", "both-attention-kept"), default=["both"],
                        help="training: plain autograd, the memory-saving backward, and/or the latter with the wired "
                             "blocks' attention kept (IDMConfig.keep_attention)")  # fmt: skip
    parser.add_argument("--mode", nargs="+", choices=("inference", "train"), default=["inference"])
    parser.add_argument("--top", type=positive_int, default=25, help="operators listed per profiled call")
    args = parser.parse_args(argv)
    device, out = setup(args)
    calls = [("inference", "both")] if "inference" in args.mode else []
    calls += [("train", variant) for variant in args.train_variants] if "train" in args.mode else []
    sections = []
    for mode, variant in calls:
        model, _, op = build_model(args.unet, None, args.steps, variant.removesuffix("-attention-kept"), args.size, device)
        if variant.endswith("-attention-kept"):
            ABLATIONS["attention-kept"](model)  # the row benchmarks.memory --ablations attention-kept measures
        if mode == "inference":
            y = op.A(torch.rand(args.batch, 1, args.size, args.size, device=device))
            model.eval()
            model.inference_precision = args.precision  # as benchmarks.speed times it

            def run(model=model, y=y, op=op) -> None:
                with torch.no_grad():
                    model(y, op)

            label = f"inference, batch {args.batch}"
        else:
            run = TrainingSetup.for_model(model, op, args.train_batch, args.size, args.precision, lr=1e-6).iteration
            label = f"training iteration ({variant}), batch {args.train_batch}"
        wall, stalled, rows = profile_call(run, device, args.warmup, args.iters)
        sections.append(report(label, wall, stalled, rows, args.top))
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
    raise SystemExit(run_script(main, "benchmarks.kernel_profile"))
