"""How a trained IDM scores on each flip and turn of the image alone: the members of ``--ensemble 8``.

    python -m benchmarks.ensemble_members --checkpoint cs-10 --data IMG [IMG ...] [--square] [--task T]
                                          [operator flags] --out FOLDER

For each image (measured as ``idm benchmark`` measures it: the checkpoint's
operator with the operator flags on top, e.g. ``--mask random --ratio 0.5``
for a model trained on a family of masks, seed ``--seed`` plus the image
index, CS images padded to the block) and each of the 8 symmetries ``g`` of :data:`operators.dihedral.DIHEDRAL`,
the reconstruction ``T_g^{-1} model(y, A T_g^{-1})`` is scored alone, by the
protocol of the task (:func:`benchmarks.protocol.score_function`). A network
that were exactly equivariant to flips and turns would score the same on
all 8; the spread says how far the trained one is, and whether the average
(``idm benchmark --ensemble``) gains from that spread or from errors that
differ. ``--square`` first crops each image to its top-left square, to
tell the image's shape from its content. Writes ``FOLDER/members.csv``
(one row per image and symmetry: PSNR, SSIM) and ``FOLDER/members.md``
(the means per symmetry), fp32.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.harness import load_images
from benchmarks.protocol import operator_factory, pad_multiple, score_function
from benchmarks.report import rounded, run_script, script_command, write_csv_and_markdown
from idm.cli.common import (add_common_args, add_operator_args, operator_overrides, resolve_device, task_color,
                            task_name)
from idm.hardware import hardware_name
from operators.dihedral import DIHEDRAL, Transformed
from tasks.data import pad_to_multiple

FIELDS = ("image", "symmetry", "psnr", "ssim")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="IDM model folder, training run or shipped model's name")
    parser.add_argument("--data", nargs="+", required=True, help="images in the task's format")
    parser.add_argument("--task", help="the task (default: the one the checkpoint's training run recorded)")
    parser.add_argument("--square", action="store_true", help="crop each image to its top-left square first")
    add_operator_args(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    return run_script(lambda _: _run(args, argv), "benchmarks.ensemble_members")


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from idm.cli.simulate import get_task
    from idm.train import load_trained

    device = resolve_device(args.device)
    recorded = argparse.Namespace(task=args.task, color=None, checkpoint=args.checkpoint)
    task = get_task(task_name(recorded), task_color(recorded))  # in the colour mode the model was trained in
    overrides = operator_overrides(args)
    task.check_flags(**overrides)
    expect = {"name": task.operator, **overrides}  # as idm benchmark asks the checkpoint
    trained = load_trained(args.checkpoint, device=device, expect_task=task.name, expect_operator=expect,
                           operator_defaults=task.operator_kwargs())  # fmt: skip
    model = trained.model.to(device).for_inference(precision="fp32")
    score = score_function(task)
    operator_for = operator_factory(task, overrides, trained.operator, args.seed)  # as idm benchmark's
    images = load_images(task, args.data, seed=args.seed)
    multiple = pad_multiple(task, operator_for(0, tuple(images[0].x.shape[-2:])))  # the CS block, as idm benchmark
    rows = []
    for index, image in enumerate(images):
        x = image.x[None].to(device)
        if args.square:
            side = min(x.shape[-2:])
            x = x[..., :side, :side]
        height, width = x.shape[-2:]
        x_padded = pad_to_multiple(x, multiple)[0] if multiple else x  # as idm benchmark pads: CS to the block
        op = operator_for(index, tuple(x_padded.shape[-2:]))
        y = op.A(x_padded)
        with torch.no_grad():
            for symmetry in DIHEDRAL:
                generator = torch.Generator(device).manual_seed(args.seed + index)  # idm benchmark's, for init="noise"
                estimate = symmetry.invert(model(y, Transformed(op, symmetry), generator=generator))
                psnr, ssim = score(estimate[..., :height, :width], x)
                rows.append({"image": image.name, "symmetry": str(symmetry), "psnr": psnr, "ssim": ssim})
    means = []
    for symmetry in DIHEDRAL:
        own = [r for r in rows if r["symmetry"] == str(symmetry)]
        psnr, ssim = statistics.fmean(r["psnr"] for r in own), statistics.fmean(r["ssim"] for r in own)
        means.append(f"| {symmetry} | {psnr:.2f} | {ssim:.4f} |")
    markdown = (f"`{script_command('benchmarks.ensemble_members', argv)}` on {hardware_name(device)}\n\n"
                f"| symmetry | PSNR (dB) | SSIM |\n|---|---|---|\n" + "\n".join(means) + "\n")
    write_csv_and_markdown(Path(args.out), "members", rounded(rows), FIELDS, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
