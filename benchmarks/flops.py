"""FLOPs per image of an IDM network, counted without computing anything (fake tensors).

    python -m benchmarks.flops --unet sd15 --size 256 --steps 3 --out benchmarks/results/flops-sd15

One inference ``model(y, op)`` runs under ``FakeTensorMode``: every operation
sees only shapes, so the ``sd15`` network at 256x256 is counted in seconds on
any machine. The counter is :func:`benchmarks.speed.flop_counter` (torch's, 2
per multiply-add, with attention counted on the CPU too). Counted with and
without the low-resolution upsamplers (:mod:`idm.unets.upsample`), split by
operation. The operator is row subsampling, whose cost is negligible: the
count is that of the network. Writes ``OUT/flops.md`` and ``OUT/flops.csv``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from deepinv.physics import LinearPhysics
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.report import run_script, script_command, write_csv_and_markdown
from benchmarks.speed import flop_counter
from idm import IDM, IDMConfig
from idm.cli.common import positive_int
from operators import unchecked_values

FIELDS = ["unet", "size", "steps", "upsamplers", "gflop_per_image", "convolution", "attention", "linear", "other"]


class RowSubsampling(LinearPhysics):
    """Keep every second row: a shape-only stand-in operator (no data-dependent checks)."""

    def A(self, x, **kwargs):
        return x[..., ::2, :]

    def A_adjoint(self, y, **kwargs):
        out = y.new_zeros(*y.shape[:-2], 2 * y.shape[-2], y.shape[-1])
        out[..., ::2, :] = y
        return out

    def A_dagger(self, y, **kwargs):
        return self.A_adjoint(y)


def _kind(op_name: str) -> str:
    if "convolution" in op_name:
        return "convolution"
    if "attention" in op_name:
        return "attention"
    if op_name.split(".")[1] in ("mm", "addmm", "bmm", "baddbmm"):
        return "linear"
    return "other"


def count(unet: str, size: int, steps: int, fold: bool) -> dict:
    """One row: total and per-kind GFLOP per image for ``model(y, op)``, batch 1."""
    torch.manual_seed(0)
    model = IDM(IDMConfig(unet=unet, image_channels=1, steps=steps)).eval()
    model.eps_net.fold_upsamplers = fold
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        y = torch.zeros(1, 1, size // 2, size)
    counter = flop_counter()
    with torch.no_grad(), fake, counter, unchecked_values():  # fake tensors have no values to check
        model(y, RowSubsampling())
    kinds = Counter()
    for op, flops in counter.get_flop_counts()["Global"].items():
        kinds[_kind(str(op))] += flops
    row = dict(unet=unet, size=size, steps=steps, upsamplers="low resolution" if fold else "diffusers")
    row["gflop_per_image"] = round(counter.get_total_flops() / 1e9, 3)
    row.update({kind: round(kinds[kind] / 1e9, 3) for kind in ("convolution", "attention", "linear", "other")})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", default="sd15", help="tiny, sd15 or a diffusers U-Net folder")
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    rows = [count(args.unet, args.size, args.steps, fold) for fold in (False, True)]
    command = script_command("benchmarks.flops", argv)
    lines = [f"`{command}` (fake tensors: no computation, any machine)", "",
             "GFLOP per image, inference, batch 1 (2 FLOPs per multiply-add):", "",
             "| upsamplers | total | convolution | attention | linear | other |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['upsamplers']} | {r['gflop_per_image']} | {r['convolution']} | {r['attention']} | {r['linear']} | "
              f"{r['other']} |" for r in rows]  # fmt: skip
    write_csv_and_markdown(Path(args.out), "flops", rows, FIELDS, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.flops"))
