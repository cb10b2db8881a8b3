"""Training memory and time of IDM's wiring variants as the number of steps T grows.

    python -m benchmarks.memory --device cuda --unet sd15 --size 256 --batch 1 8 --steps 1 2 3 6 12 --out OUT
    python -m benchmarks.memory --device cpu --unet tiny --size 32 --batch 2 --steps 1 2 4 8 --out OUT   # a CPU check
    python -m benchmarks.memory --device cuda --unet sd15 --size 256 --batch 1 --variants none both --cuda-graphs --out OUT

One training iteration = forward, L1 loss, backward, Adam step on block CS
(10%, structurally random, 32x32 blocks) with bf16 autocast on CUDA. For each
variant, batch and T it reports the median iteration time after warm-up and

* on CUDA: the peak allocated memory (``torch.cuda.max_memory_allocated``,
  everything: weights, Adam state, activations);
* on CPU: the peak of the bytes of all live tensors over one more
  iteration (weights, gradients, Adam state, activations, temporaries),
  tracked by torch's ``MemTracker`` (see :func:`tracked_peak_bytes`).

Variants: ``none`` (plain T-step network), ``checkpoint`` (plain network,
``torch.utils.checkpoint`` per step), ``steps`` (first-level wiring) and
``both`` (two-level wiring), the last two with the memory-saving backward.
``--cuda-graphs`` (CUDA) times each row by replaying its iteration captured
as one CUDA graph, so that a small batch measures the GPU's time rather than
the host's. ``--ablations`` adds rows of ``both`` with one setting of its backward
changed (:data:`ABLATIONS`): a lever switched off, or the optional
``keep_attention`` switched on. The optimizer is Adam as ``idm train`` makes it (the fused kernel on CUDA,
:mod:`idm.training.optimizer`). Writes ``OUT/memory.csv``, ``OUT/memory.png``
and ``OUT/memory.md`` (the summary table).
"""

from __future__ import annotations

import argparse
import statistics
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch

import operators
from benchmarks.report import (
    run_script,
    script_command,
    write_csv,
    write_csv_and_markdown,
)
from benchmarks.timing import (
    TrainingSetup,
    add_timing_args,
    error_line,
    median_seconds,
    seconds_of,
    setup,
)
from idm import IDM, IDMConfig
from idm.cli.common import positive_int
from idm.hardware import hardware_name
from idm.precision import training_precision

VARIANTS = {
    "none": dict(invertible="none", recompute=False),
    "checkpoint": dict(invertible="none", recompute=True),
    "steps": dict(invertible="steps", recompute=True),
    "both": dict(invertible="both", recompute=True),
}
#: Settings of the memory-saving backward that ``--ablations`` changes, one row each, for ``both``: its
#: levers switched off, and the optional attention replay (IDMConfig.keep_attention) switched on.
ABLATIONS: dict[str, Callable[[IDM], None]] = {
    # the backward recomputes every step, the last too (idm.wiring's keep_last_graph off)
    "last-step-recomputed": lambda model: setattr(model.wiring, "keep_last_graph", False),
    # the resnets outside the wired groups and the output head keep all their activations
    "unwired-layers-plain": lambda model: setattr(model.eps_net, "lean_unwired", False),
    # the wired blocks' attention products are kept from the forward, not recomputed (idm.attention_replay)
    "attention-kept": lambda model: setattr(model, "config", model.config.replace(keep_attention=True)),
}
FIELDS = ["variant", "steps", "batch", "size", "unet", "device", "params_m", "memory_mb", "memory_kind", "ms_per_iter", "timing",
          "status"]  # fmt: skip


def tracked_peak_bytes(iteration, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
    """Peak bytes of all tensors alive during one ``iteration()`` on the CPU: parameters, gradients, Adam state,
    activations and temporaries (the CPU analogue of ``torch.cuda.max_memory_allocated``).

    Uses torch's ``MemTracker`` (``torch.distributed._tools``, a dispatch-mode tracker); ``None`` where this
    torch has none. Call it after one iteration, so that the optimizer state exists.
    """
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker, warnings.catch_warnings():
        # its gradient hook finds .grad None where the memory-saving backward has set a parameter's running sum
        # aside (idm/wiring.py), and says so; the tensors themselves are tracked as they are allocated
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass of tensor, "
                                "but got <class 'NoneType'>", category=UserWarning)  # fmt: skip
        iteration()
    return max(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())


def training_setup(variant: str, steps: int, batch: int, size: int, unet: str, device: torch.device, seed: int = 0,
                   ablation: str | None = None, capturable: bool = False) -> TrainingSetup:  # fmt: skip
    """The problem of one table row, weights and data drawn from ``seed``; ``ablation`` (a key of
    :data:`ABLATIONS`, for ``both``) changes one setting of its backward; ``capturable``: ready to be
    captured as a CUDA graph (:meth:`TrainingSetup.captured_iteration`)."""
    torch.manual_seed(seed)
    model = IDM(IDMConfig(unet=unet, image_channels=1, steps=steps, **VARIANTS[variant])).to(device)
    if ablation is not None:
        ABLATIONS[ablation](model)
    op = operators.make("cs", img_size=(size, size), channels=1, ratio=0.1, mode="permuted")
    precision = training_precision("auto", device)  # as idm train's default: bf16 autocast on CUDA, fp32 on the CPU
    return TrainingSetup.for_model(model, op, batch, size, precision, lr=1e-5, capturable=capturable)


def row_label(variant: str, ablation: str | None) -> str:
    return variant if ablation is None else f"{variant}, {ablation}"


def _row(variant: str, ablation: str | None, steps: int, batch: int, size: int, unet: str, device: torch.device,
         training: TrainingSetup) -> dict:  # fmt: skip
    return dict(variant=row_label(variant, ablation), steps=steps, batch=batch, size=size, unet=unet, device=device.type,
                params_m=round(sum(p.numel() for p in training.model.parameters()) / 1e6, 3))  # fmt: skip


def _add_cpu_peak(row: dict, training: TrainingSetup) -> None:
    peak = tracked_peak_bytes(training.iteration, training.model, training.optimizer)
    row["memory_mb"] = "" if peak is None else round(peak / 2**20, 3)
    row["memory_kind"] = "not measurable with this torch" if peak is None else "peak_tracked"


def measure(variant: str, steps: int, batch: int, size: int, unet: str, device: torch.device, iters: int, warmup: int,
            seed: int = 0, ablation: str | None = None, cuda_graph: bool = False) -> dict:  # fmt: skip
    """One row of the table: build the problem (weights and data from ``seed``), train ``warmup + iters`` iterations, measure.

    ``cuda_graph``: the iterations replay one CUDA graph of the iteration, captured after warm-up
    iterations of its own (:meth:`TrainingSetup.captured_iteration`); the peak is then the replays' (the
    graph's memory pool, the weights and the optimizer state), not the eager warm-up's. cuDNN's autotuning
    (``torch.backends.cudnn.benchmark``, on in ``idm train``) stays off in every row, so that rows of
    different runs compare.
    """
    training = training_setup(variant, steps, batch, size, unet, device, seed, ablation, capturable=cuda_graph)
    row = _row(variant, ablation, steps, batch, size, unet, device, training)
    row["timing"] = "cuda graph" if cuda_graph else "eager"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = training.captured_iteration() if cuda_graph else training.iteration
    if cuda_graph and device.type == "cuda":  # the graph's own peak (its pool and the state), not the eager warm-up's
        torch.cuda.reset_peak_memory_stats(device)
    row["ms_per_iter"] = round(1000 * median_seconds(run, device, iters, warmup), 2)
    if device.type == "cuda":
        row["memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row["memory_kind"] = "peak_allocated"
    else:
        _add_cpu_peak(row, training)
    row["status"] = "ok"
    return row


def measure_interleaved(runs: list[tuple[str, str | None]], steps: int, batch: int, size: int, unet: str, device: torch.device,
                        iters: int, warmup: int, seed: int = 0) -> list[dict]:  # fmt: skip
    """The rows of ``runs`` (``(variant, ablation)`` pairs) at one batch and T, their iterations timed round-robin
    (one of each in turn), so that a machine whose speed drifts (a shared CPU) slows them alike; CPU only
    (every model is alive at once, which ``max_memory_allocated`` would count). Peaks as :func:`measure`'s."""
    setups = [training_setup(variant, steps, batch, size, unet, device, seed, ablation) for variant, ablation in runs]
    times: list[list[float]] = [[] for _ in runs]
    for i in range(warmup + iters):
        for run_times, training in zip(times, setups):
            seconds = seconds_of(training.iteration, device)
            if i >= warmup:
                run_times.append(seconds)
    rows = []
    for (variant, ablation), training, run_times in zip(runs, setups, times):
        row = _row(variant, ablation, steps, batch, size, unet, device, training)
        row["timing"] = "eager"
        row["ms_per_iter"] = round(1000 * statistics.median(run_times), 2)
        _add_cpu_peak(row, training)
        row["status"] = "ok"
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7), squeeze=False)
    for col, batch in enumerate(batches):
        for variant in row_labels(rows):
            pts = [r for r in rows if r["batch"] == batch and r["variant"] == variant and r["status"] == "ok"]
            if not pts:
                continue
            mem = [r for r in pts if r["memory_mb"] != ""]
            axes[0][col].plot([r["steps"] for r in mem], [r["memory_mb"] for r in mem], "o-", label=variant)
            axes[1][col].plot([r["steps"] for r in pts], [r["ms_per_iter"] for r in pts], "o-", label=variant)
        kind = "peak allocated" if rows[0]["device"] == "cuda" else "peak tracked"
        axes[0][col].set(title=f"batch {batch}", ylabel=f"{kind} (MiB)", yscale="log")
        axes[1][col].set(xlabel="T (sampling steps)", ylabel="ms / training iteration")
        for ax in (axes[0][col], axes[1][col]):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # T is a count
        axes[0][col].legend()
    fig.suptitle(f"IDM training memory and time, {rows[0]['unet']} U-Net, {rows[0]['size']}px, {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def row_labels(rows: list[dict]) -> list[str]:
    """The variants (and ablations) of ``rows``, each once, in the order they were measured."""
    return list(dict.fromkeys(r["variant"] for r in rows))


def summary_markdown(rows: list[dict]) -> str:
    """Memory per T for each variant, and the ratios the README quotes."""
    ok = [r for r in rows if r["status"] == "ok"]
    lines = []
    for batch in sorted({r["batch"] for r in ok}):
        pts = [r for r in ok if r["batch"] == batch]
        steps = sorted({r["steps"] for r in pts})
        get = {(r["variant"], r["steps"]): r for r in pts}
        lines += [f"batch {batch}, {pts[0]['memory_kind'].replace('_', ' ')} (MiB) / ms per iteration:", ""]
        lines += ["| variant | " + " | ".join(f"T={t}" for t in steps) + " |", "|---|" + "---|" * len(steps)]
        for variant in row_labels(rows):
            cells = []
            for t in steps:
                r = get.get((variant, t))
                cells.append("" if r is None else f"{r['memory_mb']} / {r['ms_per_iter']:.0f}" if r["memory_mb"] != "" else f"- / {r['ms_per_iter']:.0f}")
            if any(cells):
                lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
        t_max = steps[-1]
        if ("none", t_max) in get and ("both", t_max) in get:
            none, both = get[("none", t_max)], get[("both", t_max)]
            if none["memory_mb"] != "" and both["memory_mb"] != "":
                lines += ["", f"At T={t_max}: `both` uses {100 * (1 - both['memory_mb'] / none['memory_mb']):.1f}% less memory than `none`; "
                          f"a `both` iteration costs {both['ms_per_iter'] / none['ms_per_iter']:.2f}x a `none` iteration."]
            if len(steps) > 1 and ("both", steps[0]) in get and get[("both", steps[0])]["memory_mb"] not in ("", 0):
                growth = both["memory_mb"] / get[("both", steps[0])]["memory_mb"] - 1
                lines.append(f"`both` memory grows {100 * growth:.1f}% from T={steps[0]} to T={t_max}.")
        lines.append("")
    return "\n".join(lines)


def measure_or_oom(variant: str, ablation: str | None, steps: int, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    """:func:`measure`'s row, or a row that says the GPU ran out of memory."""
    try:
        return measure(variant, steps, batch, args.size, args.unet, device, args.iters, args.warmup, args.seed, ablation,
                       args.cuda_graphs)  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        status = "out of memory"
    except RuntimeError as err:
        if not args.cuda_graphs:
            raise
        status = f"capture failed: {error_line(err)}"  # the first error of the chain; the next rows still run
        traceback.print_exc()  # where in the iteration capture broke, for the device log
    torch.cuda.empty_cache()
    return dict(variant=row_label(variant, ablation), steps=steps, batch=batch, size=args.size, unet=args.unet,
                device=device.type, timing="cuda graph" if args.cuda_graphs else "eager", status=status)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(parser)
    parser.add_argument("--unet", default="sd15", help="tiny, sd15 or a diffusers U-Net folder")
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[1, 2, 3, 6, 12])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ablations", nargs="+", default=[], choices=list(ABLATIONS),
                        help="also measure `both` with each of these settings of the memory-saving backward changed, "
                             "one row each (last-step-recomputed: the backward recomputes the last step too; "
                             "unwired-layers-plain: the layers outside the wired groups keep all their activations; "
                             "attention-kept: the wired blocks keep their attention products for the backward)")  # fmt: skip
    parser.add_argument("--interleave", action="store_true",
                        help="on the CPU: time the rows of each batch and T round-robin, one iteration of each in turn, "
                             "so that a machine whose speed drifts slows them alike")  # fmt: skip
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on CUDA: time each row by replaying its training iteration captured as one CUDA graph "
                             "(no Python or kernel launches between the kernels: the GPU's own time, where a small "
                             "batch leaves it waiting on the host)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        parser.error("--cuda-graphs needs a CUDA device")
    if args.ablations and "both" not in args.variants:
        parser.error("--ablations change the `both` variant: add both to --variants")
    if args.interleave and torch.device(args.device).type != "cpu":
        parser.error("--interleave is for the CPU: on a GPU every model alive at once would count in the peak memory")
    device, out = setup(args)
    rows = []
    runs = [(v, None) for v in args.variants] + [("both", a) for a in args.ablations]
    for batch in args.batch:
        for steps in args.steps:
            if args.interleave:
                measured = measure_interleaved(runs, steps, batch, args.size, args.unet, device, args.iters, args.warmup, args.seed)
            else:
                measured = (measure_or_oom(variant, ablation, steps, batch, args, device) for variant, ablation in runs)
            for row in measured:
                rows.append(row)
                print(", ".join(f"{k}={row.get(k, '')}" for k in FIELDS), flush=True)
                write_csv(out, "memory", rows, FIELDS)  # the rows so far, if a time limit stops the run
    command = script_command("benchmarks.memory", argv)
    write_csv_and_markdown(out, "memory", rows, FIELDS, f"`{command}` on {hardware_name(device)}\n\n{summary_markdown(rows)}\n")
    plot(rows, out / "memory.png")
    print(f"wrote {out / 'memory.csv'}, {out / 'memory.png'} and {out / 'memory.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.memory"))
