"""CPU inference with glibc's own allocator against kept freed memory (:mod:`idm.cpu_memory`).

    python -m benchmarks.cpu_malloc --checkpoint cs-10 --rounds 3 --runs 10 --warmup 2 \\
        --out benchmarks/results/cpu/malloc

The setting is process-wide and cannot be undone, so every measurement is a
fresh process: ``--rounds`` times, one process with glibc's allocator and one
with freed memory kept (what ``idm``'s commands set on the CPU), in turn, so
that the machine's slow and fast minutes fall on both. Each process loads the
model as ``idm reconstruct`` does (channels-last weights, fp32 or
``--precision bf16``), runs ``model(y, op)`` at ``--size`` on the checkpoint's
own operator ``--warmup + --runs`` times, and reports for each timed run the
wall time, the minor page faults and the system CPU time, and the process's
peak resident memory (what keeping freed memory costs). Writes
``OUT/malloc.csv`` (one row per timed run) and ``OUT/malloc.md`` (min and
median per setting).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import run_script
from idm.cli.common import non_negative_int, positive_int

MODES = ("glibc", "kept")
FIELDS = ["round", "malloc", "run", "ms", "page_faults", "system_s", "peak_rss_mb"]


def measure(checkpoint: str, malloc: str, size: int, precision: str, runs: int, warmup: int) -> list[dict]:
    """``runs`` timed forwards in this process, after ``warmup`` untimed ones (``malloc`` set first)."""
    import torch

    from benchmarks.speed import load_checkpoint, make_operator
    from idm.cpu_memory import keep_freed_memory

    if malloc == "kept" and not keep_freed_memory():
        raise SystemExit("freed memory cannot be kept here (not glibc, or MALLOC_* variables set)")
    torch.manual_seed(0)
    model, config = load_checkpoint(checkpoint, torch.device("cpu"))
    model = model.for_inference(precision=precision)
    op = make_operator(config, size, model.config.image_channels)
    y = op.A(torch.rand(1, model.config.image_channels, size, size))
    rows = []
    with torch.no_grad():
        for i in range(warmup + runs):
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            model(y, op)
            seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            if i >= warmup:
                rows.append({"run": i - warmup, "ms": round(1000 * seconds, 1), "page_faults": after.ru_minflt - before.ru_minflt,
                             "system_s": round(after.ru_stime - before.ru_stime, 3)})  # fmt: skip
    peak_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux reports KiB
    return [{**r, "peak_rss_mb": peak_mb} for r in rows]


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| malloc | runs | min ms | median ms | median page faults | median system s | peak memory (MiB, largest process) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode in MODES:
        mine = [r for r in rows if r["malloc"] == mode]
        if mine:
            median = {k: statistics.median(float(r[k]) for r in mine) for k in ("ms", "page_faults", "system_s")}
            lines.append(f"| {mode} | {len(mine)} | {min(float(r['ms']) for r in mine):.0f} | {median['ms']:.0f} | "
                         f"{median['page_faults']:.0f} | {median['system_s']:.3f} | "
                         f"{max(int(r.get('peak_rss_mb', 0)) for r in mine)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="cs-10", help="a trained model folder or a shipped model's name")
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=positive_int, default=3, help="pairs of processes (glibc, kept)")
    parser.add_argument("--runs", type=positive_int, default=10, help="timed forwards per process")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed forwards first")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one measuring process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.checkpoint, args.child, args.size, args.precision, args.runs, args.warmup)))
        return 0
    import torch

    from benchmarks.report import script_command, write_csv_and_markdown
    from idm.hardware import hardware_name
    from idm.training.trained import resolve_model_dir

    resolve_model_dir(args.checkpoint)  # a clear error before the first process
    command = [sys.executable, "-m", "benchmarks.cpu_malloc", "--checkpoint", args.checkpoint, "--size", str(args.size),
               "--precision", args.precision, "--runs", str(args.runs), "--warmup", str(args.warmup)]  # fmt: skip
    rows = []
    for round_ in range(args.rounds):
        for mode in MODES:
            result = subprocess.run([*command, "--child", mode], capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"the {mode} process failed:\n{result.stderr[-2000:]}")
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            rows += [{"round": round_, "malloc": mode, **r} for r in measured]
            print(f"round {round_} {mode}: median {statistics.median(r['ms'] for r in measured):.0f} ms", flush=True)
    typed = script_command("benchmarks.cpu_malloc", argv)
    write_csv_and_markdown(Path(args.out), "malloc", rows, FIELDS,
                           f"`{typed}` on {hardware_name(torch.device('cpu'))}\n\n{summary_markdown(rows)}\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.cpu_malloc"))
