"""Tasks: each inverse problem's operator defaults, data loader and training schedule.

    import tasks
    tasks.available()                        # ['cs', 'ct', 'inpainting', 'mri']
    task = tasks.get("cs")
    op = task.make_operator((256, 256), ratio=0.3)
    data = task.dataset(["data/train"], crop=256, augment=False, seed=0)

A new task is one small file in this folder defining ``TASK = Task(...)``
(see ``tasks/cs.py``); it is found by its module name, no registration
needed. A task can also live in a package of its own: an entry point in
the group ``idm.tasks`` (in that package's ``pyproject.toml``)::

    [project.entry-points."idm.tasks"]
    decimate = "my_package.tasks:DECIMATE"     # a Task named "decimate"

names it; loading it imports its module, which may register the task's own
operator (``@operators.register``). The tasks of this folder come first: a
plug-in cannot replace one. ``tasks.data`` holds the shared loaders.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

from tasks.base import Schedule, Task

__all__ = ["ENTRY_POINT_GROUP", "Schedule", "Task", "available", "get", "provider"]

#: The entry-point group of tasks from other installed packages.
ENTRY_POINT_GROUP = "idm.tasks"

_NOT_TASKS = frozenset({"base", "data"})


def _task_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_TASKS and not m.name.startswith("_"))


def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """The ``idm.tasks`` entry points of installed packages, by name (the built-in tasks' names left out)."""
    own = {name for name in _task_modules() if _builtin(name) is not None}
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name not in own}


def _builtin(name: str) -> Task | None:
    task = getattr(importlib.import_module(f"{__name__}.{name}"), "TASK", None)
    return task if isinstance(task, Task) else None


def available() -> list[str]:
    """Names of the tasks: this package's modules with a ``TASK``, and the ``idm.tasks`` plug-ins; sorted."""
    return sorted([name for name in _task_modules() if _builtin(name) is not None] + list(_plugins()))


def provider(name: str) -> str | None:
    """The installed package that provides plug-in task ``name``, as ``"<distribution> <version>"``
    (recorded by ``idm train``, so that a checkpoint of a plug-in task can say what to install); ``None`` for a
    task of this folder, an unknown name, or an entry point whose distribution is not known."""
    if name in _task_modules() and _builtin(name) is not None:
        return None
    plugin = _plugins().get(name)
    dist = getattr(plugin, "dist", None)
    return None if dist is None else f"{dist.name} {dist.version}"


def get(name: str) -> Task:
    """The :class:`Task` named ``name``; ``ValueError`` listing the available ones otherwise."""
    if name in _task_modules():
        task = _builtin(name)
        if task is not None:
            if task.name != name:
                raise ValueError(f"tasks/{name}.py defines a task named {task.name!r}; the name must match the file")
            return task
    plugin = _plugins().get(name)
    if plugin is not None:
        try:
            task = plugin.load()
        except Exception as err:  # a broken plug-in: say which, and why, instead of a traceback
            raise ValueError(f"task {name!r} ({ENTRY_POINT_GROUP} entry point {plugin.value!r}) failed to load: {err}") from err
        if not isinstance(task, Task) or task.name != name:
            raise ValueError(
                f"the {ENTRY_POINT_GROUP} entry point {name!r} ({plugin.value!r}) must name a tasks.Task called {name!r}, "
                f"got {task!r:.100}"
            )
        return task
    raise ValueError(f"unknown task {name!r}; available: {', '.join(available())}")
