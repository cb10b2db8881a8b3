"""The one exception type raised for problems with data files and folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["DataError", "check_file"]


class DataError(ValueError):
    """A file or folder could not be used as data.

    Raised for missing, empty, unreadable, truncated or wrongly formatted files
    and folders (and for crop sizes that do not fit the data). The message
    always names the offending path (or the sizes involved). Subclasses
    :class:`ValueError`, so ``except ValueError`` also catches it.
    """


def check_file(path: Union[str, os.PathLike]) -> Path:
    """``Path(path)`` if it is an existing regular file, else :class:`DataError` naming it."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file does not exist")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    return p
