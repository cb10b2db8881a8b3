"""Tasks: each inverse problem's operator defaults, data loader and training schedule.

    import tasks
    tasks.available()                        # ['cs', 'ct', 'inpainting', 'mri']
    task = tasks.get("cs")
    op = task.make_operator((256, 256), ratio=0.3)
    data = task.dataset(["data/train"], crop=256, augment=False, seed=0)

A new task is one small file in this folder defining ``TASK = Task(...)``
(see ``tasks/cs.py``); it is found by its module name, no registration
needed. ``tasks.data`` holds the shared loaders.
"""

from __future__ import annotations

import importlib
import pkgutil

from tasks.base import Schedule, Task

__all__ = ["Schedule", "Task", "available", "get"]

_NOT_TASKS = frozenset({"base", "data"})


def _task_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_TASKS and not m.name.startswith("_"))


def available() -> list[str]:
    """Names of the tasks defined in this package (modules with a ``TASK``), sorted."""
    return [name for name in _task_modules() if isinstance(getattr(importlib.import_module(f"{__name__}.{name}"), "TASK", None), Task)]


def get(name: str) -> Task:
    """The :class:`Task` named ``name``; ``ValueError`` listing the available ones otherwise."""
    if name in _task_modules():
        task = getattr(importlib.import_module(f"{__name__}.{name}"), "TASK", None)
        if isinstance(task, Task):
            if task.name != name:
                raise ValueError(f"tasks/{name}.py defines a task named {task.name!r}; the name must match the file")
            return task
    raise ValueError(f"unknown task {name!r}; available: {', '.join(available())}")
