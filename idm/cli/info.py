"""``idm info``: versions, devices, the registered forward models and the shipped models."""

from __future__ import annotations

import argparse
import platform

import torch

from idm.cli.common import add_common_args, resolve_device


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show versions, devices and available operators")
    add_common_args(parser, out_help="also write this information as JSON to this file", out_required=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import operators
    from idm import __version__
    from idm.checkpoint import save_json
    from idm.hardware import hardware_name
    from idm.precision import resolve_precision
    from idm.shipped import shipped_models

    device = resolve_device(args.device)
    info = {
        "idm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device if device.type == "cuda" else 0) if torch.cuda.is_available() else None,
        "hardware": hardware_name(device),
        "precision_auto": resolve_precision("auto", device),
        "operators": operators.available(),
        "shipped_models": [{"name": m.name, "task": m.task, "path": str(m.path)} for m in shipped_models()],
    }
    print(f"idm {info['idm']} | python {info['python']} | torch {info['torch']}")
    print(f"device: {device} (CUDA: {info['cuda_device'] or 'none'}): {info['hardware']}")
    print(f"--precision auto runs {info['precision_auto']} on {device}")
    print(f"operators: {', '.join(info['operators'])}")
    shipped = ", ".join(f"{m['name']} ({m['task']})" for m in info["shipped_models"])
    print(f"shipped models: {shipped or 'none'}")
    if args.out:
        save_json(info, args.out)
    return 0
