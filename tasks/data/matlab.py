"""Reading MATLAB ``.mat`` files (v4, v5/v7 via SciPy; v7.3 = HDF5 via h5py).

MATLAB stores arrays column-major; in a v7.3 (HDF5) file h5py therefore sees
every array with its axes reversed. :func:`load_mat` reverses them back, so a
MATLAB ``256x128`` matrix is returned with shape ``(256, 128)`` for every
file version. Complex v7.3 arrays (HDF5 compound ``real``/``imag``) are
returned as complex NumPy arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import h5py
import numpy as np
import scipy.io

from .errors import DataError, check_file

__all__ = ["load_mat", "mat_array_shape", "MAT_EXTENSIONS"]

PathLike = Union[str, os.PathLike]

#: File name endings recognised as MATLAB files.
MAT_EXTENSIONS: tuple[str, ...] = (".mat",)

#: MATLAB classes of numeric matrices (``char``, ``cell``, ``struct`` and the like are not images).
NUMERIC_CLASSES = frozenset(
    {"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "logical"}
)


def _is_numeric(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "biufc"


def _h5_to_numpy(dset: h5py.Dataset) -> Optional[np.ndarray]:
    """Numeric array of an HDF5 dataset with MATLAB's axis order, else None."""
    dt = dset.dtype
    if dt.names is not None:  # complex: compound ('real', 'imag')
        if set(dt.names) != {"real", "imag"}:
            return None
        raw = dset[()]
        arr = raw["real"] + 1j * raw["imag"]
    elif dt.kind in "biuf":
        arr = dset[()]
    else:  # references (cells, structs), strings, ...
        return None
    arr = np.asarray(arr)
    if dset.attrs.get("MATLAB_empty", 0):  # empty arrays are stored as their dims
        return None
    return np.ascontiguousarray(arr.T)  # undo column-major storage


def _candidates_v73(f: h5py.File) -> dict[str, h5py.Dataset]:
    return {k: v for k, v in f.items() if isinstance(v, h5py.Dataset) and not k.startswith("#")}


def _pick(path: Path, shapes: dict[str, tuple[tuple[int, ...], bool]], key: Optional[str]) -> str:
    """Choose the variable name: ``key`` or the single 2-D numeric matrix."""
    if key is not None:
        if key not in shapes:
            raise DataError(
                f"{path}: no variable {key!r} (variables: {', '.join(sorted(shapes)) or 'none'})"
            )
        if not shapes[key][1]:
            raise DataError(f"{path}: variable {key!r} is not a numeric array")
        return key
    matrices = [
        k for k, (shape, numeric) in shapes.items()
        if numeric and len(shape) == 2 and min(shape) > 1
    ]
    if len(matrices) != 1:
        what = "no" if not matrices else f"{len(matrices)} ({', '.join(sorted(matrices))})"
        raise DataError(
            f"{path}: found {what} 2-D numeric matrices, and the command line reads files of exactly one; save one "
            f"image matrix per file, or choose one in Python with MatFolderDataset(..., key=NAME) "
            f"(variables: {', '.join(sorted(shapes)) or 'none'})"
        )
    return matrices[0]


def _shapes(path: Path) -> tuple[bool, dict[str, tuple[tuple[int, ...], bool]]]:
    """(is_v73, {name: (MATLAB shape, numeric?)}) without loading the data."""
    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as f:
                out = {}
                for k, d in _candidates_v73(f).items():
                    numeric = (d.dtype.names is not None and set(d.dtype.names) == {"real", "imag"}) or (
                        d.dtype.kind in "biuf" and not d.attrs.get("MATLAB_empty", 0)
                    )
                    matlab_class = d.attrs.get("MATLAB_class", b"")  # v7.3 stores char arrays as uint16 codes
                    matlab_class = matlab_class.decode() if isinstance(matlab_class, bytes) else str(matlab_class)
                    numeric = numeric and (not matlab_class or matlab_class in NUMERIC_CLASSES)
                    out[k] = (tuple(reversed(d.shape)), bool(numeric))
                return True, out
        except Exception as exc:
            raise DataError(f"{path}: cannot read HDF5 (MATLAB v7.3) file ({exc})") from exc
    try:
        info = scipy.io.whosmat(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a MATLAB .mat file ({type(exc).__name__}: {exc})") from exc
    return False, {name: (tuple(shape), cls in NUMERIC_CLASSES) for name, shape, cls in info}


def mat_array_shape(path: PathLike, key: Optional[str] = None) -> tuple[int, ...]:
    """Shape of the array :func:`load_mat` would return, read without loading it."""
    p = check_file(path)
    _, shapes = _shapes(p)
    return shapes[_pick(p, shapes, key)][0]


def load_mat(path: PathLike, key: Optional[str] = None) -> np.ndarray:
    """Load one numeric array from a MATLAB ``.mat`` file (any version).

    With ``key`` the variable of that name is returned; without it the file
    must hold exactly one 2-D numeric matrix (both sizes > 1; scalars and
    vectors are ignored), which is returned. The array keeps its stored dtype
    (e.g. float64, complex128) and MATLAB's axis order (v7.3 files are
    transposed back).

    Raises :class:`DataError` naming the file if it does not exist, is not a
    .mat file, lacks ``key``, ``key`` is not numeric, or no single 2-D matrix
    can be chosen.
    """
    p = check_file(path)
    is_v73, shapes = _shapes(p)
    name = _pick(p, shapes, key)
    try:
        if is_v73:
            with h5py.File(p, "r") as f:
                arr = _h5_to_numpy(f[name])
        else:
            arr = scipy.io.loadmat(str(p), variable_names=[name])[name]
    except Exception as exc:
        raise DataError(f"{p}: cannot read variable {name!r} ({type(exc).__name__}: {exc})") from exc
    if arr is None or not _is_numeric(np.asarray(arr)):
        raise DataError(f"{p}: variable {name!r} is not a numeric array")
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr
