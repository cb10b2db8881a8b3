"""``idm info``: versions, devices, the registered forward models and the shipped models."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from idm.cli.common import add_common_args, resolve_device


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show versions, devices and available tasks and operators",
        description="Print the versions of idm and torch, the device and the precision --precision auto picks on it, "
        "the tasks (with those of installed plug-ins) and registered operators, and the shipped (and $IDM_MODELS_DIR) models and priors.",
    )
    add_common_args(parser, out_help="also write this information as JSON to this file", out_required=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import operators
    import tasks
    from idm import __version__
    from idm.checkpoint import save_json
    from idm.hardware import hardware_name
    from idm.precision import resolve_precision
    from idm.shipped import PACKAGED_DIR, shipped_models, shipped_priors

    device = resolve_device(args.device)
    task_names = tasks.available()
    for name in task_names:  # a plug-in task's module registers its operator when it loads
        try:
            tasks.get(name)
        except ValueError as err:
            print(f"idm info: warning: {err}", file=sys.stderr)
    info = {
        "idm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device if device.type == "cuda" else 0) if torch.cuda.is_available() else None,
        "hardware": hardware_name(device),
        "precision_auto": resolve_precision("auto", device),
        "tasks": task_names,
        "operators": operators.available(),
        "shipped_models": [{"name": m.name, "task": m.task, "path": str(m.path)} for m in shipped_models()],
        "priors": [{"name": p.name, "path": str(p)} for p in shipped_priors()],
    }
    print(f"idm {info['idm']} | python {info['python']} | torch {info['torch']}")
    print(f"device: {device} (CUDA: {info['cuda_device'] or 'none'}): {info['hardware']}")
    print(f"--precision auto runs {info['precision_auto']} on {device}")
    print(f"tasks: {', '.join(info['tasks'])}")
    print(f"operators: {', '.join(info['operators'])}")
    packaged = PACKAGED_DIR.resolve()
    for heading, entries in _by_folder(info["shipped_models"], packaged).items():
        print(f"{heading}: " + (", ".join(f"{m['name']} ({m['task']})" for m in entries) or "none"))
    for heading, entries in _by_folder(info["priors"], packaged, "priors").items():
        print(f"{heading}: " + ", ".join(m["name"] for m in entries))
    if args.out:
        save_json(info, args.out)
    return 0


def _by_folder(entries: list[dict], packaged, what: str = "models") -> dict[str, list[dict]]:
    """Entries under their heading: ``shipped <what>`` for the packaged ones (those that a same-named entry of
    ``$IDM_MODELS_DIR`` hides marked), ``<what> in $IDM_MODELS_DIR (...)`` for the user's, listed first."""
    from pathlib import Path

    from idm.shipped import MODELS_ENV

    packaged_entries = [e for e in entries if Path(e["path"]).parent.resolve() == packaged]
    user = [e for e in entries if e not in packaged_entries]
    hidden = {e["name"] for e in user}
    shipped = [{**e, "name": e["name"] + (" [hidden by $IDM_MODELS_DIR]" if e["name"] in hidden else "")}
               for e in packaged_entries]  # fmt: skip
    groups = {f"{what} in ${MODELS_ENV} ({Path(user[0]['path']).parent})": user} if user else {}
    if shipped or what == "models":
        groups[f"shipped {what}"] = shipped
    return groups
