"""``idm demo``: run every shipped model on sample images that come with the install.

    idm demo                      # writes idm-demo/demo.md, demo.png, per-setting grids and CSVs
"""

from __future__ import annotations

import argparse

from idm.cli.common import add_common_args, add_precision_arg, resolve_device, resolve_precision_arg, seed_everything


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the shipped models on bundled sample images",
        description="Reconstruct bundled sample images with every shipped model (CS at 10/20/30/50% and inpainting on "
        "scikit-image's photographs, MRI and CT on the Shepp-Logan phantom) next to the pseudo-inverse; writes OUT/demo.md (PSNR, SSIM, seconds), OUT/demo.png "
        "(ground truth | A^+ y | IDM) and per-setting grids and results.csv.",
    )
    add_common_args(parser, out_help="output folder (default: idm-demo)", out_required=False)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_precision_arg(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from idm.demo import run_demo

    seed_everything(args.seed)
    out = args.out or "idm-demo"
    device = resolve_device(args.device)
    text = run_demo(out, device, seed=args.seed, progress=not args.no_progress,
                    precision=resolve_precision_arg(args, device))  # fmt: skip
    print(text)
    print(f"idm demo: pictures and tables in {out}/ (demo.png, demo.md)")
    return 0
