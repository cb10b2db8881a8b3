"""The ``idm`` command line: ``idm <command> [options]`` (also ``python -m idm``).

Each command is a module of this package with ``add_parser(subparsers)`` and
``run(args) -> int``; :data:`COMMANDS` lists them in the order ``--help``
shows. This package is the one place where the core (``idm``), the tasks and
the benchmarks are wired together.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from idm import __version__
from idm.cli.common import run_guarded
from idm.cpu_memory import keep_freed_memory
from idm.sibling_packages import check_sibling_packages

#: Command modules, relative to this package.
COMMANDS: tuple[str, ...] = ("info", "demo", "pretrain", "train", "export", "benchmark", "simulate", "reconstruct")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idm",
        description="Invertible Diffusion Models for imaging inverse problems (CS, inpainting, MRI, CT).",
    )
    parser.add_argument("--version", action="version", version=f"idm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idm`` console script; returns the exit status."""
    try:  # the commands import the toolkit's tasks package: a user's tasks.py in its place is named, not a traceback
        check_sibling_packages(("tasks",))
    except ImportError as err:
        print(f"idm: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if str(getattr(args, "device", "")).startswith("cpu"):
        keep_freed_memory()  # ~100,000 fewer page faults per 256x256 forward (idm.cpu_memory)
    return run_guarded(lambda: args.run(args), f"idm {args.command}")
