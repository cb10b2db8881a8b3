"""The toolkit's other top-level packages (``operators``, ``tasks``) must be the ones installed beside ``idm``.

The user fixed the layout: ``idm/``, ``operators/`` and ``tasks/`` are
top-level packages. ``python -m idm`` (and any script) puts its own folder
first on ``sys.path``, so a user's ``operators.py`` or ``tasks/`` package
there would be imported in their place and fail far from the cause. This
check, run when ``idm`` is imported, names the file instead. It only looks
the packages up (``importlib.util.find_spec``); nothing is imported.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: Top-level packages that ship with ``idm`` and that it imports.
SIBLING_PACKAGES = ("operators", "tasks")


def check_sibling_packages(names: tuple[str, ...] = SIBLING_PACKAGES) -> None:
    """An ``ImportError`` naming the file when one of ``names`` (``operators``, ``tasks``) resolves to another
    file than the package installed beside ``idm`` (a module of that name in the current folder, or earlier on
    ``sys.path``). ``import idm`` checks ``operators``, which it imports; the ``idm`` command checks ``tasks``
    too (a user's own ``tasks.py`` does not stop a script that only uses the model)."""
    root = Path(__file__).resolve().parent.parent
    for name in names:
        expected = root / name / "__init__.py"
        found = _where(name)
        if found is None or not Path(found).is_file() or not Path(found).resolve().samefile(expected):
            raise ImportError(
                f"idm needs its own {name!r} package ({expected}), but {name!r} resolves to {found or 'nothing'}: "
                f"a module, package or folder named {name!r} in the current folder (or earlier on sys.path) hides it; "
                "rename it, run from another folder, or use the idm command (or python -P -m idm, which leaves the "
                "current folder out)",
                name="idm",  # idm is what failed to import: python -m idm then prints this one line, not a traceback
            )


def _where(name: str) -> str | None:
    """The file that ``import name`` runs (an imported module's, else the one it would find), the folder of a
    namespace package (a folder without ``__init__.py``), or ``None`` when there is none."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None) or ", ".join(getattr(module, "__path__", []))
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    return spec.origin if spec.has_location else ", ".join(spec.submodule_search_locations or [])
