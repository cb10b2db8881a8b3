"""``idm info``: versions, devices, the registered forward models and the shipped models."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from idm.cli.common import add_common_args, resolve_device


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show versions, devices and available tasks and operators",
        description="Print the versions of idm and torch, the device and the precision --precision auto picks on it, "
        "the tasks (with those of installed plug-ins) and registered operators, and the shipped (and $IDM_MODELS_DIR) models and priors. "
        "With --checkpoint, describe that model instead: what it was trained for, its architecture and what was wired, "
        "and how it was trained.",
    )
    add_common_args(parser, out_help="also write this information as JSON to this file", out_required=False)
    parser.add_argument("--checkpoint", help="an IDM model folder, an `idm train` --out folder or a shipped model's name")
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
    if args.out and Path(args.out).is_dir():  # checked before anything is printed
        raise ValueError(f"--out {args.out!r} is a folder; idm info --out takes the name of a JSON file (e.g. --out info.json)")
    if args.checkpoint:
        return describe_checkpoint(args.checkpoint, args.out)
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


def describe_checkpoint(path: str, out: str | None = None) -> int:
    """Print what the model at ``path`` is: its folder, task and operator (as its training recorded them), its
    architecture (the :class:`idm.IDMConfig` fields, parameters, the U-Net's groups, chains and injectors) and
    its training (iteration, seconds, hardware, command, from ``provenance.json`` of an export or the run
    record); with ``out``, also as JSON."""
    from idm.checkpoint import load_json_record, save_json
    from idm.export import PROVENANCE_NAME
    from idm.train import load_trained
    from idm.training.options import recorded_run_identity
    from idm.training.state import TRAINER_STATE_NAME

    trained = load_trained(path)
    model = trained.model
    run = trained.run or {}
    settings = run.get("settings", {})
    provenance = load_json_record(trained.path / PROVENANCE_NAME, "provenance")  # an export's
    state = load_json_record(trained.path / TRAINER_STATE_NAME, "trainer state")  # a training checkpoint's
    info = {
        "path": str(trained.path),
        "task": trained.task,
        "operator": trained.recorded_operator,
        "model": model.config.to_dict(),
        "unet_class": model.unet_class,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {
            "iteration": provenance.get("iteration", run.get("iteration")),
            "seconds": provenance.get("training_seconds", state.get("seconds")),
            "hardware": provenance.get("hardware", settings.get("hardware")),
            "arithmetic": provenance.get("arithmetic", settings.get("arithmetic")),
            "command": provenance.get("command", settings.get("command")),
            "prior": settings.get("prior"),
            "recipe": recorded_run_identity(run).get("training"),  # runs that recorded "amp" say precision
            "averaged_iterations": provenance.get("averaged_iterations"),  # idm export --average-from
        },
    }
    print(f"model: {info['path']}")
    if trained.run is None:
        print("task: not recorded (a bare model folder: no run.json)")
    else:
        print(f"task: {info['task'] or 'not recorded'}; operator: {_operator_words(info['operator'])}")
    config = info["model"]
    print(f"network: T={config['steps']}, invertible={config['invertible']!r}, injectors={config['injectors']}, "
          f"init={config['init']!r}, final_projection={config['final_projection']}, {info['parameters'] / 1e6:.2f}M "
          f"parameters, U-Net {info['unet_class']} from {config['unet']!r}")  # fmt: skip
    print(model.eps_net.describe())
    training = info["training"]
    if training["iteration"] is not None:
        seconds = f", {training['seconds']:.0f} s" if training["seconds"] is not None else ""
        arithmetic = f" in {training['arithmetic']}" if training["arithmetic"] else ""
        ema_decay = (training["recipe"] or {}).get("ema_decay")
        averaged = f"; the weights are their moving average (EMA decay {ema_decay})" if ema_decay else ""
        if training["averaged_iterations"]:
            averaged += (f"; exported as the mean of the weights of its checkpoints at iterations "
                         f"{', '.join(str(i) for i in training['averaged_iterations'])}")  # fmt: skip
        print(f"trained: {training['iteration']} iterations{seconds} on {training['hardware'] or 'unrecorded hardware'}"
              + arithmetic + (f", prior {training['prior']}" if training["prior"] else "") + averaged)  # fmt: skip
    if training["command"]:
        print(f"command: {training['command']}")
    if out:
        save_json(info, out)
    return 0


def _operator_words(config) -> str:
    """A recorded operator config in words: one operator's settings, or a family's varied ranges."""
    from operators.family import is_family_config
    from tasks.measurements import describe_operator

    if not config:
        return "not recorded"
    if "name" not in config:
        return f"{config.get('class', 'a plug-in physics')} (not one of the toolkit's operators)"
    if not is_family_config(config):
        return describe_operator(config)
    parts = []
    for component in config.get("components", []):
        vary = component.get("vary", {})
        fixed = describe_operator({k: v for k, v in component["base"].items() if k not in vary})
        varied = ", ".join(f"{k} drawn from {v}" for k, v in vary.items())
        parts.append((fixed[:-1] + (", " if not fixed.endswith("()") else "") + varied + ")") if varied else fixed)
    return "a family: " + "; ".join(parts)
