"""``idm export``: turn a training run into a small model folder to ship or share.

    idm export --checkpoint runs/cs-any --out idm/weights/cs-any-ratio --prior-name prior-natural-y
    idm export --checkpoint runs/prior --out idm/weights/prior-natural-y        # an `idm pretrain` run
    idm export --checkpoint idm/weights/ct-60 --final-projection --out /tmp/ct-60  # switch the projection on
    idm export --checkpoint runs/cs-any --average-from 500 --out /tmp/cs-any-avg  # the mean of checkpoints >= 500
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from idm.cli.common import add_common_args, resolve_device


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model (fp16 IDM folder, or a pretrained prior) with its provenance",
        description="Write a model folder with float16 weights (learnable scalars kept float32), the run's task and "
        "operator record, and provenance.json (source, iterations, seconds, hardware, command). For an "
        "`idm pretrain` run folder, export its prior (a diffusers folder, float16 unless --fp32) instead.",
    )
    parser.add_argument("--checkpoint", required=True, help="an `idm train` --out folder or one of its checkpoints (a model), or an `idm pretrain` --out "
                        "folder (its prior, as last exported)")
    parser.add_argument("--fp32", action="store_true", help="keep float32 weights")
    parser.add_argument("--prior-name", help="record this name as the model's prior instead of the local path")
    parser.add_argument("--hardware", help="what it was trained on, for a run that does not record it (it replaces what a run records)")
    parser.add_argument("--final-projection", action=argparse.BooleanOptionalAction, default=None,
                        help="switch the parameter-free projection of the output onto the measurements on or off "
                        "(IDMConfig.final_projection; default: as trained)")
    parser.add_argument("--average-from", type=int, metavar="ITER",
                        help="export the uniform average of the weights of the run's checkpoints at iteration ITER or "
                        "later (at least two; --checkpoint a training --out folder) instead of its latest checkpoint")
    add_common_args(parser, out_help="the folder to write (replaced atomically)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from idm.export import export_model, export_prior, prior_name_warning, weights_megabytes
    from idm.pretrain import is_pretrain_run

    resolve_device(args.device)  # nothing runs on it, but a device this machine lacks is still refused
    source = Path(args.checkpoint)
    if is_pretrain_run(source):
        for flag, value in (("--final-projection", args.final_projection), ("--prior-name", args.prior_name),
                            ("--average-from", args.average_from)):
            if value is not None:
                raise ValueError(f"{source} is an `idm pretrain` run: {flag} applies to IDM models, not priors")
        out = export_prior(source, args.out, half=not args.fp32, hardware=args.hardware)
    else:
        out = export_model(source, args.out, half=not args.fp32, prior_name=args.prior_name, hardware=args.hardware,
                           final_projection=args.final_projection, average_from=args.average_from)
        warning = prior_name_warning(args.prior_name, source, out) if args.prior_name is not None else None
        if warning:
            warnings.warn(warning, stacklevel=1)
    print(f"idm export: {out} ({weights_megabytes(out):.1f} MiB of weights)")
    return 0
