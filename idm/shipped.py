"""Shipped (pretrained) IDM models: the checkpoint ``idm reconstruct`` uses without ``--checkpoint``.

    from idm.shipped import default_checkpoint
    folder = default_checkpoint("cs", {"name": "cs", "ratio": 0.1, "mode": "permuted", "block": 32})
    # -> Path of an installed model folder, or None

**No weights ship yet** (they will be trained on a GPU later), so
:data:`SHIPPED_MODELS` is empty and :func:`default_checkpoint` returns
``None``; ``idm reconstruct`` then asks for ``--checkpoint``.

This module is the one place where shipped models plug in. To ship one:

1. train it (``idm train``) and copy its latest checkpoint folder (an IDM
   model folder with ``run.json``, so the task and operator are checked on
   load) to ``models_dir() / FOLDER``;
2. add ``ShippedModel(task, {operator settings it was trained for}, FOLDER)``
   to :data:`SHIPPED_MODELS`.

A request matches an entry when the task is the same and every operator
setting the entry lists equals the request's (numbers compared with a
relative tolerance of 1e-9); settings the entry does not list (``img_size``,
``seed``, ...) are not compared. The first installed match wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from idm.training.trained import same_setting

#: Environment variable naming the folder shipped models are installed in.
MODELS_ENV = "IDM_MODELS_DIR"


@dataclass(frozen=True)
class ShippedModel:
    """One shipped model: the task and operator settings it serves, and its folder under :func:`models_dir`."""

    task: str
    operator: Mapping[str, Any] = field(default_factory=dict)
    folder: str = ""


#: The shipped models, most specific first. Empty: no weights ship yet.
SHIPPED_MODELS: tuple[ShippedModel, ...] = ()


def models_dir() -> Path:
    """Where shipped models are installed: ``$IDM_MODELS_DIR``, else ``~/.cache/idm/models``."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "idm" / "models"


def default_checkpoint(task: str, operator_config: Mapping[str, Any]) -> Path | None:
    """The installed shipped model folder for ``task`` and ``operator_config``, or ``None``.

    Args:
        task: task name (``"cs"``, ``"mri"``...).
        operator_config: the requested operator settings, e.g. ``op.config()``
            or ``{"name": "cs", "ratio": 0.1, ...}``.

    Returns ``None`` when no shipped model matches or the matching one is not
    installed (always, for now: no weights ship yet).
    """
    for entry in SHIPPED_MODELS:
        if entry.task != task:
            continue
        if all(key in operator_config and same_setting(operator_config[key], want) for key, want in entry.operator.items()):
            folder = models_dir() / entry.folder
            if folder.is_dir():
                return folder
    return None


def describe_request(task: str, operator_config: Mapping[str, Any]) -> str:
    """``"task 'cs' (ratio=0.1, block=32, mode='permuted')"``: the request, for messages."""
    shown = {k: v for k, v in operator_config.items() if k not in ("name", "img_size", "seed", "columns", "mask")}
    settings = ", ".join(f"{k}={v!r}" for k, v in shown.items())
    return f"task {task!r}" + (f" ({settings})" if settings else "")


def missing_message(task: str, operator_config: Mapping[str, Any]) -> str:
    """The error shown when no shipped model serves a request."""
    return (
        f"no shipped model is installed for {describe_request(task, operator_config)} "
        "(no pretrained weights ship with this version yet); pass --checkpoint DIR "
        "(an IDM model folder or an `idm train` --out folder)"
    )
