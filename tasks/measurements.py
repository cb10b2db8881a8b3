"""Measurement files: what ``idm simulate`` writes and ``idm reconstruct`` reads.

Two formats, both read without pickle (``np.load(..., allow_pickle=False)``)
and checked completely on load (clear errors naming the file and what is
wrong, all ``ValueError`` subclasses):

**``.npz`` (every task)** -- written with ``np.savez``:

* ``meta``: a 0-d unicode array holding a JSON object::

      {"format": "idm-measurements", "version": 1, "task": "cs", "count": N,
       "truth": false, "items": [{"name": "barbara", "image_size": [H, W],
       "seed": 0, "operator": {<op.config()>}}, ...], ...extra}

  ``items[i].operator`` is the full config of image ``i``'s operator
  (``operators.from_config`` rebuilds it exactly: the same ``Phi`` and
  permutation for CS, the same mask for MRI / inpainting); its ``img_size``
  may exceed ``image_size`` when the image was zero-padded before measuring
  (CS: to a multiple of the block), and the reconstruction is cropped back
  to ``image_size`` (top-left corner). ``seed`` is the operator's seed
  (``idm simulate``: ``--seed + i`` modulo 2**32), ``None`` for operators without one.
  ``extra`` holds what the writer adds (idm version, command, CT window...).
* ``names``: unicode array ``(N,)``, the item names (unique).
* ``y``: float32 ``(N, *measurement_shape)`` when all items have the same
  shape, else ``y_0``, ``y_1``, ... one per item.
* ``x_true`` (only when the ground truth is kept, ``meta.truth`` true):
  float32 ``(N, C, H, W)`` images in [0, 1] (unpadded), or ``x_true_0``, ...

**``.npy`` sinogram + ``<file>.json`` sidecar (CT)** -- the sinogram is
float32 ``(detectors, views)`` for one slice or ``(N, detectors, views)``
(deepinv's parallel-beam layout without the channel axis; detectors =
``ceil(sqrt(2) * W)`` for ``W x W`` images); the sidecar
(``SINOGRAM.npy.json``) is::

      {"format": "idm-sinogram", "version": 1, "task": "ct",
       "operator": {<op.config()>}, "names": [...], "window": [low, high], ...}

A sinogram without its sidecar is accepted by ``idm reconstruct`` (image size
from the detector count, views from the last axis); it must then be in the
units of the toolkit's ``ct`` operator (the Radon transform of the [0, 1]
windowed image divided by its operator norm), as ``idm simulate`` writes.

This module depends on :mod:`operators` only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np

import operators
from operators import OperatorInputError

__all__ = [
    "FORMAT", "SINOGRAM_FORMAT", "VERSION", "MeasurementFileError", "Measurement", "MeasurementSet",
    "OperatorCache", "save_measurements", "load_measurements", "Sinogram", "sidecar_path", "save_sinogram",
    "load_sinogram", "looks_like_sinogram", "ct_width_for_detectors", "atomic_write", "describe_operator", "unique_names",
    "check_item_name", "check_replaceable",
]  # fmt: skip

FORMAT = "idm-measurements"
SINOGRAM_FORMAT = "idm-sinogram"
VERSION = 1

PathLike = Union[str, os.PathLike]


class MeasurementFileError(ValueError):
    """A measurement file is missing, unreadable or not what it should be (the message names it)."""


# ---- operators ------------------------------------------------------------------------------
def _config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


class OperatorCache:
    """``operators.from_config`` with one operator per distinct config.

    CT operators take seconds to build, block-CS ones about a second (a QR of
    the Gaussian matrix): a config that differs from a cached one only in its
    ``seed`` is made by ``cached.resample(seed)`` (which reuses ``Phi`` for CS)
    and kept only if its config is exactly the requested one.
    """

    def __init__(self) -> None:
        self._ops: dict[str, Any] = {}
        self._siblings: dict[str, Any] = {}

    def get(self, config: dict[str, Any]):
        key = _config_key(config)
        op = self._ops.get(key)
        if op is not None:
            return op
        rest = _config_key({k: v for k, v in config.items() if k != "seed"}) if "seed" in config else None
        sibling = self._siblings.get(rest) if rest is not None else None
        if sibling is not None and isinstance(config["seed"], int):
            candidate = sibling.resample(config["seed"])
            if _config_key(candidate.config()) == key:
                op = candidate
        if op is None:
            op = operators.from_config(dict(config))
        self.put(op, config)
        return op

    def put(self, op: Any, config: dict[str, Any] | None = None) -> None:
        """Remember ``op`` (under ``config``, default ``op.config()``)."""
        config = op.config() if config is None else config
        self._ops[_config_key(config)] = op
        if "seed" in config:
            self._siblings.setdefault(_config_key({k: v for k, v in config.items() if k != "seed"}), op)


def describe_operator(config: dict[str, Any]) -> str:
    """``"cs operator (img_size=32x32, ratio=0.1, block=32, ...)"``, leaving out bulky entries (masks, columns)."""
    parts = []
    for key, value in config.items():
        if key == "img_size" and isinstance(value, (list, tuple)):
            parts.append("img_size=" + "x".join(str(v) for v in value))
        elif key != "name" and (isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= 40)):
            parts.append(f"{key}={value}")
    name = config.get("name") or config.get("class") or "an unregistered"  # a plug-in Operator without @register: ""
    return f"{name} operator ({', '.join(parts)})"


# ---- .npz -----------------------------------------------------------------------------------
@dataclass
class Measurement:
    """One measured image.

    Attributes:
        name: item name (output files are named after it).
        y: float32 array of the operator's ``measurement_shape()``.
        operator: the operator's full config (``operators.from_config`` rebuilds it).
        image_size: ``(H, W)`` of the image before any padding (the
            reconstruction is cropped to it).
        seed: the operator's seed, or ``None``.
        x_true: float32 ``(C, H, W)`` ground truth in [0, 1], or ``None``.
    """

    name: str
    y: np.ndarray
    operator: dict[str, Any]
    image_size: tuple[int, int]
    seed: int | None = None
    x_true: np.ndarray | None = None

    @property
    def padded_size(self) -> tuple[int, int]:
        """``(H, W)`` the operator acts on (``image_size`` plus padding)."""
        return tuple(int(s) for s in self.operator["img_size"])  # type: ignore[return-value]


@dataclass
class MeasurementSet:
    """What :func:`load_measurements` returns: the task, the items, the raw ``meta`` and the file."""

    task: str
    items: list[Measurement]
    meta: dict[str, Any]
    path: Path | None = None
    cache: OperatorCache = field(default_factory=OperatorCache, repr=False)

    @property
    def has_truth(self) -> bool:
        return all(m.x_true is not None for m in self.items)

    def operator(self, index: int):
        """Item ``index``'s operator, rebuilt from its config (cached)."""
        return self.cache.get(self.items[index].operator)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file to ``path`` (no half-written files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _write_bytes(write: Callable[[Any], None]) -> Callable[[Path], None]:
    def to_path(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    return to_path


def _stack_or_split(prefix: str, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    if len({a.shape for a in arrays}) == 1:
        return {prefix: np.stack(arrays)}
    return {f"{prefix}_{i}": a for i, a in enumerate(arrays)}


def _json_number(value: Any) -> Any:
    return int(value) if isinstance(value, (np.integer,)) else value


def save_measurements(path: PathLike, task: str, items: Sequence[Measurement], extra: dict[str, Any] | None = None) -> Path:
    """Write ``items`` (measurements of task ``task``) to ``path`` (atomically; see the module docstring).

    The ground truth is stored when every item has ``x_true`` (and refused when
    only some have it). ``extra``: JSON-able facts added to ``meta``.
    """
    path = Path(path)
    if not items:
        raise MeasurementFileError(f"{path}: no measurements to write")
    names = [m.name for m in items]
    if len(set(names)) != len(names):
        raise MeasurementFileError(f"{path}: item names must be unique, got {names}")
    with_truth = [m.x_true is not None for m in items]
    if any(with_truth) and not all(with_truth):
        raise MeasurementFileError(f"{path}: either every item or none has x_true")
    ys = [np.ascontiguousarray(m.y, dtype=np.float32) for m in items]
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "task": task,
        "count": len(items),
        "truth": all(with_truth),
        "items": [
            {
                "name": m.name,
                "image_size": [int(s) for s in m.image_size],
                "seed": _json_number(m.seed),
                "operator": m.operator,
            }
            for m in items
        ],
        **(extra or {}),
    }
    arrays = {"meta": np.array(json.dumps(meta)), "names": np.array(names, dtype=str), **_stack_or_split("y", ys)}
    if meta["truth"]:
        arrays.update(_stack_or_split("x_true", [np.ascontiguousarray(m.x_true, dtype=np.float32) for m in items]))
    atomic_write(path, _write_bytes(lambda handle: np.savez(handle, **arrays)))
    return path


def _open_npz(path: Path) -> Any:
    if not path.exists():
        raise MeasurementFileError(f"measurement file {str(path)!r} does not exist")
    if not path.is_file():
        raise MeasurementFileError(f"{path}: not a file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise MeasurementFileError(f"{path}: not an .npz measurement file written by idm simulate ({err})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise MeasurementFileError(f"{path}: holds a single array, not an .npz measurement file written by idm simulate")
    return data


def _read(data: Any, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except ValueError as err:  # object arrays need pickle
        raise MeasurementFileError(f"{path}: array {key!r} cannot be read without pickle ({err})") from None
    except Exception as err:  # noqa: BLE001 -- a damaged member of the zip
        raise MeasurementFileError(f"{path}: array {key!r} is unreadable ({type(err).__name__}: {err})") from None


def _item_arrays(data: Any, prefix: str, count: int, path: Path) -> list[np.ndarray]:
    keys = set(data.files)
    if prefix in keys:
        stacked = _read(data, prefix, path)
        if stacked.ndim < 1 or stacked.shape[0] != count:
            raise MeasurementFileError(f"{path}: {prefix!r} has shape {stacked.shape}, expected {count} items along its first axis")
        return list(stacked)
    missing = [f"{prefix}_{i}" for i in range(count) if f"{prefix}_{i}" not in keys]
    if missing:
        raise MeasurementFileError(
            f"{path}: no {prefix!r} array (nor {prefix}_0 ... {prefix}_{count - 1}); missing {', '.join(missing[:3])}"
            f" (found: {', '.join(sorted(keys)) or 'nothing'})"
        )
    return [_read(data, f"{prefix}_{i}", path) for i in range(count)]


def _float_array(a: np.ndarray, what: str, path: Path) -> np.ndarray:
    if a.dtype.kind != "f":
        raise MeasurementFileError(f"{path}: {what} must be a float array, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise MeasurementFileError(f"{path}: {what} contains NaN or inf")
    return np.ascontiguousarray(a, dtype=np.float32)


def _size_pair(value: Any, what: str, path: Path) -> tuple[int, int]:
    from operators import check_img_size

    try:
        return check_img_size(value)
    except ValueError as err:
        raise MeasurementFileError(f"{path}: {what}: {err}") from None


def load_measurements(path: PathLike, cache: OperatorCache | None = None) -> MeasurementSet:
    """Read and check a measurement ``.npz`` (see the module docstring).

    Every item's operator is rebuilt (``operators.from_config``, cached) and
    its ``y`` checked against ``measurement_shape()``; ``x_true`` against the
    image size. Raises :class:`MeasurementFileError` (file structure) or
    :class:`operators.OperatorInputError` (an operator config that cannot be
    built, or a ``y`` of the wrong shape), each naming the file.
    """
    path = Path(path)
    cache = cache or OperatorCache()
    with _open_npz(path) as data:
        keys = set(data.files)
        for key in ("meta", "names"):
            if key not in keys:
                raise MeasurementFileError(
                    f"{path}: not an idm measurement file: no {key!r} array (found: {', '.join(sorted(keys)) or 'nothing'})"
                )
        raw = _read(data, "meta", path)
        try:
            meta = json.loads(str(raw[()]) if raw.ndim == 0 else str(raw))
        except ValueError as err:
            raise MeasurementFileError(f"{path}: 'meta' is not valid JSON ({err})") from None
        if not isinstance(meta, dict):
            raise MeasurementFileError(f"{path}: 'meta' must be a JSON object, got {type(meta).__name__}")
        if meta.get("format") != FORMAT:
            raise MeasurementFileError(f"{path}: meta format is {meta.get('format')!r}, expected {FORMAT!r}")
        check_recorded_window(meta, path)
        version = meta.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise MeasurementFileError(f"{path}: measurement file version {version!r} is not supported (this idm reads up to {VERSION})")
        task = meta.get("task")
        entries = meta.get("items")
        if not isinstance(task, str) or not task:
            raise MeasurementFileError(f"{path}: meta has no task name")
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise MeasurementFileError(f"{path}: meta 'items' must be a non-empty list of objects")
        count = len(entries)
        names = _read(data, "names", path)
        if names.dtype.kind != "U" or names.shape != (count,):
            raise MeasurementFileError(f"{path}: 'names' must be {count} strings, got dtype {names.dtype} shape {names.shape}")
        names = [str(n) for n in names]
        if len(set(names)) != count:
            raise MeasurementFileError(f"{path}: item names are not unique")
        for name in names:
            check_item_name(name, path)
        ys = _item_arrays(data, "y", count, path)
        truth = bool(meta.get("truth", False))
        xs: list[np.ndarray | None] = _item_arrays(data, "x_true", count, path) if truth else [None] * count

        _register_operators_of(task, entries, path, meta.get("task_package"))
        items = []
        for i, (entry, name, y, x) in enumerate(zip(entries, names, ys, xs)):
            where = f"{path}: item {i} ({name})"
            if entry.get("name", name) != name:
                raise MeasurementFileError(f"{where}: meta names it {entry.get('name')!r}")
            config = entry.get("operator")
            if not isinstance(config, dict) or "name" not in config:
                raise MeasurementFileError(f"{where}: no operator config in meta")
            try:
                op = cache.get(config)
            except OperatorInputError as err:
                raise OperatorInputError(f"{where}: its operator config cannot be rebuilt: {err}") from None
            y = _float_array(y, f"item {i} ({name}) y", path)
            shape = tuple(op.measurement_shape())
            if tuple(y.shape) != shape:
                raise OperatorInputError(
                    f"{where}: y has shape {tuple(y.shape)}, but its {describe_operator(config)} measures {shape}"
                )
            padded = tuple(op.img_hw)
            image_size = _size_pair(entry.get("image_size", padded), f"item {i} image_size", path)
            if image_size[0] > padded[0] or image_size[1] > padded[1]:
                raise MeasurementFileError(f"{where}: image_size {image_size} exceeds the operator's img_size {padded}")
            if x is not None:
                x = _float_array(x, f"item {i} ({name}) x_true", path)
                want = (op.channels, *image_size)
                if tuple(x.shape) != want:
                    raise MeasurementFileError(f"{where}: x_true has shape {tuple(x.shape)}, expected {want}")
                if x.size and (x.min() < 0 or x.max() > 1):  # the ground truth is scored as an image in [0, 1]
                    raise MeasurementFileError(f"{where}: x_true has values in [{x.min():g}, {x.max():g}], not in [0, 1]")
            seed = entry.get("seed")
            items.append(Measurement(name, y, dict(config), image_size, seed if isinstance(seed, int) else None, x))
    return MeasurementSet(task, items, meta, path, cache)


def _register_operators_of(task: str, entries: list[dict], path: Path, package: Any = None) -> None:
    """Load ``task`` when the file's operators are not registered yet: a task from another package (an
    ``idm.tasks`` entry point) registers its operator when its module is imported. ``package``: the one the
    file records as providing the task (``idm simulate`` records a plug-in's), named when it is missing."""
    unknown = {str(e.get("operator", {}).get("name")) for e in entries if isinstance(e.get("operator"), dict)}
    unknown -= set(operators.available())
    if not unknown:
        return
    import tasks

    try:
        tasks.get(task)
    except ValueError as err:
        needs = f"; install {package}, which provided it" if isinstance(package, str) and package else ""
        raise MeasurementFileError(
            f"{path}: measured with the operator {', '.join(sorted(unknown))} of task {task!r}, which this installation "
            f"does not have: {err}{needs}"
        ) from None


# ---- CT sinograms ---------------------------------------------------------------------------
def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar of a sinogram: ``SINO.npy`` -> ``SINO.npy.json``."""
    return Path(str(path) + ".json")


def ct_width_for_detectors(detectors: int) -> int | None:
    """The image width ``W`` whose ``ct`` sinogram has ``detectors = ceil(sqrt(2) W)`` cells, or ``None``."""
    guess = int(detectors / math.sqrt(2))
    for w in range(max(1, guess - 2), guess + 3):
        if math.ceil(math.sqrt(2) * w) == detectors:
            return w
    return None


@dataclass
class Sinogram:
    """A loaded sinogram: ``data`` float32 ``(N, detectors, views)``, the sidecar (or ``None``), item names."""

    path: Path
    data: np.ndarray
    info: dict[str, Any] | None
    names: list[str]

    @property
    def views(self) -> int:
        return int(self.data.shape[-1])

    @property
    def detectors(self) -> int:
        return int(self.data.shape[-2])


def save_sinogram(
    path: PathLike,
    sinograms: np.ndarray,
    operator_config: dict[str, Any],
    names: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``sinograms`` ``(N, detectors, views)`` (one channel) as ``path`` (.npy) plus its sidecar.

    One slice is stored as ``(detectors, views)``. Returns both paths.
    """
    path = Path(path)
    data = np.ascontiguousarray(sinograms, dtype=np.float32)
    if data.ndim != 3 or data.shape[0] != len(names):
        raise MeasurementFileError(f"{path}: sinograms must be (N, detectors, views) for {len(names)} names, got {data.shape}")
    info = {
        "format": SINOGRAM_FORMAT,
        "version": VERSION,
        "task": "ct",
        "layout": "(detectors, views)" if data.shape[0] == 1 else "(slices, detectors, views)",
        "operator": operator_config,
        "names": list(names),
        **(extra or {}),
    }
    atomic_write(path, _write_bytes(lambda handle: np.save(handle, data[0] if data.shape[0] == 1 else data, allow_pickle=False)))
    side = sidecar_path(path)
    atomic_write(side, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    return path, side


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError) as err:
        raise MeasurementFileError(f"{side}: unreadable sinogram sidecar ({err})") from None
    if not isinstance(info, dict) or info.get("format") != SINOGRAM_FORMAT:
        raise MeasurementFileError(f"{side}: not an idm sinogram sidecar (format {SINOGRAM_FORMAT!r})")
    config = info.get("operator")
    if not isinstance(config, dict) or config.get("name") != "ct":
        raise MeasurementFileError(f"{side}: the sidecar's operator must be a 'ct' operator config")
    return info


def check_replaceable(path: PathLike) -> None:
    """A :class:`MeasurementFileError` unless ``path`` (an ``F.npz`` or ``F.npy`` to write) may be written:
    it does not exist, or it is a measurement file that ``idm simulate`` wrote (an ``.npz`` of format
    :data:`FORMAT`; an ``.npy`` with an idm sinogram sidecar), which a new run replaces. Anything else
    there is the user's, and is not overwritten."""
    path = Path(path)
    side = sidecar_path(path) if path.suffix.lower() == ".npy" else None
    if not path.exists() and not (side is not None and side.exists()):
        return
    if path.is_dir():
        raise MeasurementFileError(f"--out {path} is a folder: give the measurement file to write (F.npz or F.npy)")
    if path.is_file() and path.stat().st_size == 0 and not (side is not None and side.exists()):
        return  # an empty file (mktemp's): nothing to lose
    ours = False
    try:
        if side is not None:
            ours = _read_sidecar(path) is not None
        else:
            with np.load(path, allow_pickle=False) as stored:
                ours = "meta" in stored.files and json.loads(str(stored["meta"])).get("format") == FORMAT
    except Exception:  # noqa: BLE001 -- unreadable or foreign: not ours
        ours = False
    if not ours:
        taken = path if path.exists() else side
        raise MeasurementFileError(f"--out {path}: {taken} exists and was not written by idm simulate; it would be "
                                   "replaced: choose another name (nothing was overwritten)")  # fmt: skip


def looks_like_sinogram(path: PathLike) -> bool:
    """Whether a ``.npy`` file is a sinogram rather than a CT slice in HU.

    True when it has a sidecar, or when its last two axes differ (CT images
    are square; a sinogram is ``detectors x views``). A square array without
    a sidecar is taken for an image.
    """
    path = Path(path)
    if sidecar_path(path).is_file():
        return True
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # noqa: BLE001 -- the reader that follows reports it
        return False
    return arr.ndim in (2, 3) and arr.shape[-1] != arr.shape[-2]


def check_recorded_window(record: dict[str, Any], path: PathLike) -> None:
    """A :class:`MeasurementFileError` naming ``path`` unless ``record``'s ``"window"`` (the HU window CT images
    were measured in, which ``idm reconstruct`` maps its outputs back to HU with) is absent or two numbers
    ``[low, high]`` with ``low < high``."""
    window = record.get("window")
    if window is None:
        return
    from tasks.data.ct_slices import check_window

    try:
        if not isinstance(window, list) or len(window) != 2 or any(isinstance(v, bool) for v in window):
            raise ValueError(f"got {window!r}")
        check_window(*window)
    except ValueError as err:
        raise MeasurementFileError(f"{path}: 'window' must be two numbers [low, high] (HU, low < high): {err}") from None


def load_sinogram(path: PathLike, cache: OperatorCache | None = None) -> Sinogram:
    """Read a sinogram ``.npy`` and its sidecar (if any), checked against each other.

    Raises :class:`MeasurementFileError` / :class:`OperatorInputError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MeasurementFileError(f"sinogram {str(path)!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise MeasurementFileError(f"{path}: not a readable .npy sinogram ({err})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim not in (2, 3) or 0 in arr.shape:
        raise MeasurementFileError(f"{path}: a sinogram must be (detectors, views) or (N, detectors, views) with no empty "
                                   f"axis, got shape {getattr(arr, 'shape', None)}")  # fmt: skip
    if arr.dtype.kind not in "fiu":
        raise MeasurementFileError(f"{path}: a sinogram must hold real numbers (float or integer), got dtype {arr.dtype}")
    data = _float_array(arr if arr.dtype.kind == "f" else arr.astype(np.float32), "the sinogram", path)
    if data.ndim == 2:
        data = data[None]
    # line integrals of a non-negative image: never all negative (a slice of air, in a volume, is all zeros)
    if not data.any():
        raise MeasurementFileError(f"{path}: the sinogram{'s are' if len(data) > 1 else ' is'} all zeros: nothing was measured")
    for index, sinogram in enumerate(data):
        if sinogram.any() and not (sinogram > 0).any():
            which = f"sinogram {index} of {len(data)}" if len(data) > 1 else "the sinogram"
            raise MeasurementFileError(f"{path}: {which} is nowhere positive (largest value {sinogram.max():g}; negated?): "
                                       "a CT sinogram holds line integrals of a non-negative image")  # fmt: skip
    info = _read_sidecar(path)
    if info is not None:
        check_recorded_window(info, sidecar_path(path))
    count = data.shape[0]
    names = [f"{path.stem}_s{i}" for i in range(count)] if count > 1 else [path.stem]
    if info is not None:
        side = sidecar_path(path)
        listed = info.get("names")
        if isinstance(listed, list) and len(listed) == count and all(isinstance(n, str) for n in listed):
            names = [check_item_name(n, side) for n in listed]
        cache = cache or OperatorCache()
        try:
            op = cache.get(info["operator"])
        except OperatorInputError as err:
            raise OperatorInputError(f"{side}: its operator config cannot be rebuilt: {err}") from None
        shape = tuple(op.measurement_shape())
        if op.channels != 1 or tuple(data.shape[1:]) != shape[1:]:
            raise OperatorInputError(
                f"{path}: the sinogram has {data.shape[-2]} detectors x {data.shape[-1]} views, but its sidecar's "
                f"{describe_operator(info['operator'])} measures {shape[1]} x {shape[2]}"
            )
    return Sinogram(path, data, info, names)


def check_item_name(name: str, path: PathLike) -> str:
    """``name`` if it can name output files (``NAME.png``, ``NAME.npy``) inside the output folder, else an error naming ``path``.

    An item name read from a file must not lead out of the folder that ``idm
    reconstruct`` writes to: no path separators, NUL, ``.`` or ``..``, and not empty.
    """
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise MeasurementFileError(f"{path}: item name {name!r} is not a plain file name (no '/', '\\', '..' or empty names)")
    return name


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` with repeats made unique: the first keeps its name, the next get the first free ``_2``,
    ``_3``... suffix, free meaning that no other name, given or made, is already that (``x, x_2, x`` gives
    ``x, x_2, x_3``)."""
    names = list(names)
    taken, used = set(names), set()
    out: list[str] = []
    for name in names:
        if name in used:
            n = 2
            while f"{name}_{n}" in taken:
                n += 1
            name = f"{name}_{n}"
            taken.add(name)
        used.add(name)
        out.append(name)
    return out
