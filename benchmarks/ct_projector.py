"""Time the ``ct`` operator's sparse-matrix projector against deepinv's ``grid_sample`` one.

    python -m benchmarks.ct_projector --device cpu --size 256 --views 60 --batch 2 \\
        --out benchmarks/results/cpu/ct-projector

Both compute the same maps (``tests/test_operators.py::test_ct_matrix_is_deepinv_tomography``):
deepinv's ``Tomography`` with ``adjoint_via_backprop=True`` (the exact adjoint) and the
toolkit's ``operators.make("ct")``. Timed per configuration, median wall time:

* ``A``: the sinogram of a ``(batch, 1, size, size)`` image;
* ``A_adjoint``: the back-projection of a sinogram;
* ``pinv_A_train``: ``A^+ A f`` (FBP of the sinogram) and the backward of a sum of it,
  what every measurement injector costs per training step;
* ``build``: constructing the operator (deepinv's grids; the toolkit also writes out
  its sparse matrix and runs a float64 power iteration for ``||R||``).

Writes ``OUT/ct_projector.json`` and ``OUT/ct_projector.md``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.report import run_script, script_command
from benchmarks.timing import add_timing_args, median_seconds, setup
from idm.cli.common import positive_int


def _deepinv_tomography(op, device: torch.device):
    from deepinv.physics import Tomography

    tomo = Tomography(angles=op.angles.float().to(device), img_width=op.img_hw[1], circle=False,
                      adjoint_via_backprop=True, normalize=False, device=device)
    norm = op.radon_norm
    return {
        "A": lambda x: tomo.A(x) / norm,
        "A_adjoint": lambda y: tomo.A_adjoint(y) / norm,
        "A_dagger": lambda y: tomo.fbp(y * norm),
    }


def main(argv: list[str] | None = None) -> int:
    import operators
    from idm.checkpoint import save_json
    from idm.hardware import hardware_name

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=positive_int, default=256, help="image side (default 256)")
    parser.add_argument("--views", type=positive_int, default=60, help="projection angles (default 60)")
    parser.add_argument("--batch", type=positive_int, default=2, help="images per call (default 2)")
    add_timing_args(parser)
    args = parser.parse_args(argv)
    device, out = setup(args)

    start = time.perf_counter()
    op = operators.make("ct", img_size=(args.size, args.size), views=args.views)
    x = torch.rand(args.batch, 1, args.size, args.size, device=device)
    op.A(x)  # the float32 matrix on this device is built on first use
    build_matrix = time.perf_counter() - start
    start = time.perf_counter()
    grid = _deepinv_tomography(op, device)
    build_grid = time.perf_counter() - start
    sparse = {"A": op.A, "A_adjoint": op.A_adjoint, "A_dagger": op.A_dagger}

    y = op.A(x)
    f = x.clone().requires_grad_(True)
    rows = []
    for name, impl, build in (("deepinv grid_sample", grid, build_grid), ("sparse matrix", sparse, build_matrix)):
        def train_step(impl=impl):
            impl["A_dagger"](impl["A"](f)).sum().backward()

        with torch.no_grad():
            a = median_seconds(lambda impl=impl: impl["A"](x), device, args.iters, args.warmup)
            at = median_seconds(lambda impl=impl: impl["A_adjoint"](y), device, args.iters, args.warmup)
        train = median_seconds(train_step, device, args.iters, args.warmup)
        rows.append({"projector": name, "A_ms": 1e3 * a, "A_adjoint_ms": 1e3 * at,
                     "pinv_A_train_ms": 1e3 * train, "build_s": build})

    command = script_command("benchmarks.ct_projector", argv)
    record = {"command": command, "hardware": hardware_name(device), "threads": torch.get_num_threads(),
              "size": args.size, "views": args.views, "batch": args.batch, "rows": rows}
    save_json(record, out / "ct_projector.json")
    table = [f"# ct projector: {args.size}x{args.size}, {args.views} views, batch {args.batch}", "",
             f"`{command}`", "", f"Hardware: {record['hardware']} ({record['threads']} threads). "
             "Median wall times.", "",
             "| projector | A (ms) | A_adjoint (ms) | A^+ A f, forward + backward (ms) | build (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['projector']} | {r['A_ms']:.1f} | {r['A_adjoint_ms']:.1f} | {r['pinv_A_train_ms']:.1f} "
                     f"| {r['build_s']:.1f} |")
    text = "\n".join(table) + "\n"
    (out / "ct_projector.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.ct_projector"))
