"""What one IDM training forward keeps for its backward, module by module.

    python -m benchmarks.saved_tensors --device cpu --unet sd15 --size 128 --batch 1 --steps 1 --variant both --out OUT

Runs the forward of one training iteration of ``benchmarks.memory`` (block CS
at 10 %, same model, data and autocast) under
``torch.autograd.graph.saved_tensors_hooks`` and charges every tensor that
autograd keeps for the backward to the module that was running when it was
saved: the innermost one at most ``--depth`` dotted names deep (e.g.
``eps_net.unet.up_blocks.1.resnets.0`` at depth 6). Parameters are left
out, and a storage kept by several operations is counted once, for the
first. A layer run under checkpointing (``idm.unets.conv_outputs_only``)
has its input charged to the module that called it (``eps_net``); the
tensors it keeps are seen from torch 2.14 on (earlier versions keep them
outside the saved-tensor hooks). This is the activation part of ``benchmarks.memory``'s peak, before
the backward's own temporaries (the memory-saving backward rebuilds one
layer at a time). Writes ``OUT/saved_tensors.csv`` (every module) and
``OUT/saved_tensors.md`` (the total and the ``--top`` largest).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.memory import ABLATIONS, VARIANTS, training_setup
from benchmarks.report import run_script, script_command, write_csv_and_markdown
from idm.cli.common import positive_int, seed_value
from idm.hardware import hardware_name
from idm.unets import check_unet_source

FIELDS = ["module", "mib", "percent"]
OUTSIDE = "(outside the modules)"


def saved_bytes_by_module(model: nn.Module, run: Callable[[], Any], depth: int) -> Counter:
    """Bytes autograd saves for backward during ``run()``, by the name of the module that saved them."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    running = [OUTSIDE]
    counted: set[int] = set()
    by_module: Counter = Counter()

    def enter(name: str) -> Callable:
        return lambda module, args: running.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in counted:
            counted.add(storage.data_ptr())
            by_module[running[-1]] += storage.nbytes()
        return t

    hooks = []
    for name, module in model.named_modules():
        if name and name.count(".") < depth:
            hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return by_module


def summary_markdown(rows: list[dict], total_mib: float, top: int) -> str:
    lines = [f"Kept for backward: **{total_mib:.1f} MiB** in all; the {min(top, len(rows))} largest modules:", "",
             "| module | MiB | % |", "|---|---|---|"]  # fmt: skip
    lines += [f"| `{r['module']}` | {r['mib']} | {r['percent']} |" for r in rows[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--unet", default="sd15", help="tiny, sd15 or a diffusers U-Net folder")
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--steps", type=positive_int, default=1)
    parser.add_argument("--variant", default="both", choices=list(VARIANTS))
    parser.add_argument("--ablation", choices=list(ABLATIONS), help="change this setting of `both` (benchmarks.memory's --ablations)")
    parser.add_argument("--depth", type=positive_int, default=6, help="module names at most this many dotted parts deep")
    parser.add_argument("--top", type=positive_int, default=25, help="modules listed in the markdown summary")
    args = parser.parse_args(argv)
    if args.ablation and args.variant != "both":
        parser.error("--ablation changes the `both` variant: use --variant both")
    check_unet_source(args.unet)  # before --out is created
    device, out = torch.device(args.device), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    training = training_setup(args.variant, args.steps, args.batch, args.size, args.unet, device, args.seed, args.ablation)
    by_module = saved_bytes_by_module(training.model, training.forward, args.depth)
    total = sum(by_module.values())
    rows = [dict(module=name, mib=round(n / 2**20, 2), percent=round(100 * n / max(total, 1), 1))
            for name, n in by_module.most_common()]  # fmt: skip
    command = script_command("benchmarks.saved_tensors", argv)
    markdown = f"`{command}` on {hardware_name(device)}\n\n{summary_markdown(rows, total / 2**20, args.top)}\n"
    write_csv_and_markdown(out, "saved_tensors", rows, FIELDS, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.saved_tensors"))
