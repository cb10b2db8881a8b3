"""Safe files: atomic writes, safetensors weights, JSON metadata. Nothing is ever pickled.

Every writer goes through :func:`atomic_write`: the bytes land in a temporary
file in the destination folder, are flushed to disk, and the file is then
renamed over the destination, so a crash never leaves a half-written
checkpoint and never destroys the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint or config file is missing, unreadable, truncated or of another kind."""


def process_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~process_umask())  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor has no NaN or inf: one float64 sum (NaN and inf propagate through it; finite float32
    values cannot sum past float64's 1.8e308), twice as fast as ``isfinite`` with its boolean copy; ``isfinite``
    itself for tensors a float64 sum does not take (float8, devices without float64)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        return bool(torch.isfinite(t.sum(dtype=torch.float64)))
    except (RuntimeError, TypeError):
        return bool(torch.isfinite(t).all())


def check_weights_fit(
    expected: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], source: str | Path, what: str
) -> None:
    """Raise :class:`CheckpointError` unless ``weights`` has exactly ``expected``'s keys, each of its shape,
    and no NaN or inf (a damaged file: a model with NaN weights reconstructs nothing).

    Args:
        expected: the receiving module's state dict (or the part of it the file holds).
        weights: what was read from ``source``.
        source: the file, for the message.
        what: the receiver, for the message (``"this IDM"``, ``"the U-Net"``).
    """
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing ({_first_keys(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_first_keys(unexpected)})" if unexpected else "",
                 f"{len(wrong)} of another shape ({_first_keys(wrong)})" if wrong else ""]  # fmt: skip
        raise CheckpointError(f"weights in {source} do not fit {what}: " + "; ".join(p for p in parts if p))
    broken = sorted(k for k, v in weights.items() if not all_finite(v))
    if broken:
        raise CheckpointError(f"weights in {source} hold NaN or inf ({_first_keys(broken, 3)}): the file is damaged")


def _first_keys(keys: list[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB pieces (a CT volume may be hundreds of MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(2**20), b""):
            digest.update(piece)
    return digest.hexdigest()


def save_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON, atomically; a ``ValueError`` naming the file if ``obj`` is not JSON (e.g. a
    NumPy number in an operator's config), with nothing written."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot write {str(path)!r}: its content is not JSON ({err})") from None
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_json(path: str | Path, what: str = "config") -> Any:
    """Read a JSON file; a :class:`CheckpointError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{what} file {str(path)!r} is not valid JSON: {err}") from None


def load_json_record(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object of an optional record file (a trainer state, a provenance): ``{}`` when the file does not
    exist; a :class:`CheckpointError` naming the file when it is not valid JSON or not an object."""
    if not Path(path).is_file():
        return {}
    record = load_json(path, what)
    if not isinstance(record, dict):
        raise CheckpointError(f"{what} file {str(path)!r} is not a JSON object; the folder is damaged")
    return record


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a flat dict of tensors as safetensors, atomically (tensors are made contiguous CPU copies); a
    failed write (a full disk) is an ``OSError`` naming the file, with nothing left of it."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(flat, str(tmp), metadata=metadata)
        except SafetensorError as err:  # safetensors reports its I/O errors as its own type
            raise OSError(f"cannot write {str(path)!r}: {err}") from None

    return atomic_write(path, write)


def load_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (empty when it has none); a :class:`CheckpointError`
    naming the file if it is missing or its header is unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"weights file {str(path)!r} is unreadable or truncated: {err}") from None


def json_sha256(record: Any) -> str:
    """SHA-256 of ``record``'s canonical JSON (sorted keys, no spaces): the same for a record and its JSON
    round trip, so a weights file can name the config it was saved with."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a :class:`CheckpointError` naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"weights file {str(path)!r} is unreadable or truncated: {err}") from None
