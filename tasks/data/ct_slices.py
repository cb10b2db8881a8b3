"""CT slices: DICOM (pydicom), ``.npy`` in Hounsfield units, multi-page TIFF volumes.

Hounsfield units (HU): air is -1000, water 0, dense bone about +2000.
Out-of-field padding values (-2000, -3024, ...) occur in clinical data; the
readers clip values below :data:`HU_MIN` = -1024 (``clip_air=True``).

:func:`hu_window` maps HU linearly to [0, 1]. Default window
:data:`DEFAULT_HU_WINDOW` = [-1024, 3071]: the full 12-bit range of clinical
CT scanners (stored values 0..4095 minus 1024). For a reconstruction benchmark
the map should be linear over everything the scanner measures, so that the
[0, 1] image stays an affine function of the attenuation (mu / mu_water =
1 + HU / 1000, hence x = 0 is air and x is proportional to HU + 1024, i.e.
almost proportional to mu) and a CT forward operator applied to it remains
physically meaningful; a narrow display window (e.g. soft tissue
:data:`SOFT_TISSUE_WINDOW` = [-160, 240]) would clip bone and air and make
the "ground truth" a non-linear function of the object. Use narrow windows
for display only.

The TIFF volume ``ct_head_10slices.tiff`` (uint16, 10 x 256 x 256) used in
development is NOT in HU: its values are 0..51076 and every value is a perfect
square ``k**2`` with k in 0..226 (a gamma-2 encoded 8-bit display image; as
HU + 1024 brain tissue would read about +5000 HU, which is impossible).
:func:`read_tiff_volume` therefore offers three ``units``:

* ``"intensity"``: raw / max over the volume, [0, 1] relative intensities,
  no window (the default until the calibration below existed). Brain tissue
  of that volume reads 0.14 so, against 0.26 for brain in HU windowed by
  :data:`DEFAULT_HU_WINDOW`.
* ``"hu"``: TIFFs that store HU as they are (signed integers or floats:
  air at -1000).
* ``"hu+1024"``: TIFFs that do store HU + 1024.
* ``"display-gamma2"``: a gamma-2 encoded display image, calibrated to HU.
  The display level ``k = sqrt(raw)`` is taken as linear in HU (a display
  window), and fixed by two anchors: level 0 is air (-1000 HU), and the
  volume's soft-tissue mode is :data:`SOFT_TISSUE_HU` (brain, +40 HU). The
  mode is the most frequent level at or above a tenth of the top level
  (below that: air and the partial volume at the skin). For the development
  volume the mode is level 84. Bone (levels 150-190) then reads 860-1350 HU,
  and the top level (226) reads 1800 HU: the range of skull bone. So the
  windowed slices have the intensities of the clinical test slices.
* ``"auto"`` (the default): ``"hu"`` when the volume holds a value below
  -500 (air is -1000 HU; an intensity or display level is never negative,
  and a small negative value is more likely rounding than HU),
  ``"display-gamma2"`` when every value is the square of an integer
  display level and the top level is 16..255 (what such an encoding writes,
  and what a raw scan almost never is), else ``"intensity"``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from .errors import DataError, check_file

__all__ = [
    "HU_MIN",
    "DEFAULT_HU_WINDOW",
    "SOFT_TISSUE_WINDOW",
    "CT_EXTENSIONS",
    "check_window",
    "hu_window",
    "inverse_hu_window",
    "read_dicom_hu",
    "read_npy_hu",
    "read_tiff_volume",
    "display_levels_to_hu",
    "tiff_units_of",
    "ct_num_slices",
    "read_ct_slice",
]

PathLike = Union[str, os.PathLike]
Array = Union[np.ndarray, torch.Tensor]

#: Lowest HU kept by the readers (air; padding values below are clipped to it).
HU_MIN: float = -1024.0
#: Default window of :func:`hu_window`: the full 12-bit clinical range (see module doc).
DEFAULT_HU_WINDOW: tuple[float, float] = (-1024.0, 3071.0)
#: Soft-tissue display window (level 40, width 400); for display, not benchmarks.
SOFT_TISSUE_WINDOW: tuple[float, float] = (-160.0, 240.0)
#: File endings handled by :func:`read_ct_slice` / :func:`ct_num_slices`.
CT_EXTENSIONS: tuple[str, ...] = (".dcm", ".npy", ".tif", ".tiff")
TIFF_UNITS: tuple[str, ...] = ("auto", "intensity", "hu", "hu+1024", "display-gamma2")
#: A TIFF volume with a value below this holds HU as they are (air, -1000 HU), for ``tiff_units="auto"``.
HU_AIR_BELOW = -500.0
#: HU of the soft-tissue mode (brain) that anchors ``units="display-gamma2"``.
SOFT_TISSUE_HU: float = 40.0
#: HU of display level 0 (air) for ``units="display-gamma2"``.
AIR_HU: float = -1000.0

# JPEG 2000 transfer syntaxes (lossless, lossy, HTJ2K variants).
_J2K_SYNTAXES = {
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
}


def check_window(low: float, high: float, what: str = "window") -> tuple[float, float]:
    """``(low, high)`` as floats, finite with ``low < high`` (an infinite window maps every HU to NaN), or a
    ``ValueError`` naming ``what``."""
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise ValueError(f"{what} needs two numbers low < high, got low={low!r}, high={high!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{what} needs finite low < high, got low={low}, high={high}")
    return low, high


def hu_window(hu: Array, low: float = DEFAULT_HU_WINDOW[0], high: float = DEFAULT_HU_WINDOW[1]) -> Array:
    """Map Hounsfield units linearly to [0, 1]: ``clip((hu - low) / (high - low), 0, 1)``.

    ``hu``: NumPy array or torch tensor of any shape. Returns float32 of the
    same kind and shape. Default window [-1024, 3071] HU (the full 12-bit CT
    range, linear in attenuation; see the module docstring for why).
    Raises :class:`ValueError` naming ``hu`` if it holds NaN, or for
    ``low >= high``.
    """
    low, high = check_window(low, high, "hu_window")
    if isinstance(hu, torch.Tensor):
        x = hu.to(torch.float32)
        if torch.isnan(x).any():
            raise ValueError("hu contains NaN values")
        return ((x - low) / (high - low)).clamp(0.0, 1.0)
    x = np.asarray(hu, dtype=np.float32)
    if np.isnan(x).any():
        raise ValueError("hu contains NaN values")
    return np.clip((x - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)


def inverse_hu_window(x: Array, low: float = DEFAULT_HU_WINDOW[0], high: float = DEFAULT_HU_WINDOW[1]) -> Array:
    """HU of a windowed image: ``low + x * (high - low)`` (exact inside the window)."""
    low, high = check_window(low, high, "inverse_hu_window")
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32) * (high - low) + low
    return (np.asarray(x, dtype=np.float32) * np.float32(high - low) + np.float32(low)).astype(np.float32)


def _decoder_hint(ts_uid: str) -> str:
    if ts_uid in _J2K_SYNTAXES:
        return ("JPEG 2000 decoding needs `pip install pylibjpeg pylibjpeg-openjpeg` "
                "or a Pillow built with OpenJPEG")
    if ts_uid.startswith("1.2.840.10008.1.2.4."):
        return ("JPEG decoding needs `pip install pylibjpeg pylibjpeg-libjpeg` "
                "(or python-gdcm)")
    if ts_uid == "1.2.840.10008.1.2.5":
        return "RLE decoding needs NumPy or `pip install pylibjpeg pylibjpeg-rle`"
    return "install pylibjpeg with its plugins or python-gdcm"


def _check_ct_header(ds, p: Path) -> None:
    """A :class:`DataError` naming ``p`` unless ``ds`` is a single-sample (greyscale) CT image."""
    modality = ds.get("Modality", None)
    if modality != "CT":
        raise DataError(f"{p}: DICOM Modality is {modality!r}, not 'CT' (only CT is supported)")
    samples, photometric = ds.get("SamplesPerPixel", 1), str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise DataError(f"{p}: a CT image has one greyscale sample per pixel; this file has SamplesPerPixel "
                        f"{samples} and PhotometricInterpretation {photometric!r} (a secondary capture?)")


def _frame_rescales(ds, frames: int) -> list[tuple[float, float]] | None:
    """``(slope, intercept)`` per frame: top-level tags, else the Enhanced CT functional groups; None if absent."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return [(float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0)))] * frames

    def of(group) -> tuple[float, float] | None:
        items = group.get("PixelValueTransformationSequence", None) if group is not None else None
        if not items or "RescaleIntercept" not in items[0]:
            return None
        return float(items[0].get("RescaleSlope", 1.0)), float(items[0].RescaleIntercept)

    shared = ds.get("SharedFunctionalGroupsSequence", None)
    common = of(shared[0]) if shared else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None) or []
    rescales = [of(per_frame[i]) if i < len(per_frame) else None for i in range(frames)]
    rescales = [own or common for own in rescales]
    return None if any(r is None for r in rescales) else rescales


def _stored_to_hu(raw: np.ndarray, ds, p: Path) -> np.ndarray:
    """Stored values ``(H, W)`` or ``(frames, H, W)`` -> float32 HU, by the file's rescale (or modality LUT)."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    frames = raw.shape[0] if raw.ndim == 3 else 1
    rescales = _frame_rescales(ds, frames)
    if rescales is None:
        raise DataError(f"{p}: no RescaleSlope/RescaleIntercept (top level or Enhanced CT functional groups): "
                        "the stored values cannot be converted to HU")
    for slope, intercept in rescales:
        if not (np.isfinite(slope) and slope > 0 and np.isfinite(intercept)):
            raise DataError(f"{p}: RescaleSlope {slope:g} and RescaleIntercept {intercept:g} cannot convert the stored "
                            "values to HU (the slope must be positive, both finite)")  # fmt: skip
    slope = np.array([r[0] for r in rescales], dtype=np.float64).reshape((-1, 1, 1) if raw.ndim == 3 else ())
    intercept = np.array([r[1] for r in rescales], dtype=np.float64).reshape(slope.shape)
    return (raw.astype(np.float64) * slope + intercept).astype(np.float32)


def read_dicom_hu(path: PathLike, clip_air: bool = True) -> np.ndarray:
    """Read a CT DICOM file into Hounsfield units.

    Applies the rescale (RescaleSlope / RescaleIntercept, at the top level or,
    for Enhanced CT, in the shared or per-frame functional groups) or the
    modality LUT. Returns
    float32 ``(H, W)`` (``(frames, H, W)`` for multi-frame files); values
    below -1024 are clipped to -1024 when ``clip_air``.

    Raises :class:`DataError` naming the file if it is not DICOM, its
    Modality is not "CT", it is not greyscale (one sample per pixel), it has
    no pixel data or no rescale to HU, or its compressed pixel data cannot be
    decoded (the message names the package needed).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    p = check_file(path)
    try:
        ds = pydicom.dcmread(p)
    except InvalidDicomError as exc:
        raise DataError(f"{p}: not a DICOM file ({exc})") from exc
    except Exception as exc:
        raise DataError(f"{p}: cannot read DICOM ({type(exc).__name__}: {exc})") from exc
    _check_ct_header(ds, p)
    if "PixelData" not in ds:
        raise DataError(f"{p}: DICOM file has no pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    try:
        raw = ds.pixel_array
    except Exception as exc:
        if ts is not None and ts.is_compressed:
            raise DataError(
                f"{p}: cannot decode compressed pixel data ({ts.name}, {ts}): "
                f"{_decoder_hint(str(ts))}. ({type(exc).__name__}: {exc})"
            ) from exc
        raise DataError(f"{p}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    try:
        hu = _stored_to_hu(raw, ds, p)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot apply rescale to HU ({type(exc).__name__}: {exc})") from exc
    if clip_air:
        hu = np.maximum(hu, np.float32(HU_MIN))
    return hu


def _check_slice_shape(shape: tuple[int, ...], p: Path) -> None:
    if len(shape) not in (2, 3) or 0 in shape:
        raise DataError(f"{p}: expected (H, W) or (N, H, W) with no empty axis, got shape {shape}")
    if len(shape) == 3 and shape[2] <= 4 < shape[1]:  # (H, W, 1) or (H, W, 3) would read as H slices of W x 1 pixels
        raise DataError(f"{p}: shape {tuple(shape)} reads as {shape[0]} slices of {shape[1]}x{shape[2]} pixels; it looks "
                        "like one slice with a trailing channel axis: save a slice as (H, W), a stack as (N, H, W)")  # fmt: skip


def _validate_hu(arr: np.ndarray, p: Path) -> np.ndarray:
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{p}: expected a numeric HU array, got dtype {arr.dtype}")
    _check_slice_shape(arr.shape, p)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{p}: contains NaN or infinite values")
    return arr


def read_npy_hu(path: PathLike, clip_air: bool = True) -> np.ndarray:
    """Read a ``.npy`` slice ``(H, W)`` or stack ``(N, H, W)`` stored in HU (e.g. int16).

    Returns float32 HU of the same shape; values below -1024 (out-of-field
    padding such as -2000 / -3024) are clipped to -1024 when ``clip_air``.
    Raises :class:`DataError` naming the file if unreadable, non-numeric,
    of another dimensionality, holding NaN, or in [0, 1] rather than HU
    (values that vary within [-1, 2]: an image, not a CT slice).
    """
    p = check_file(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{p}: cannot read .npy ({type(exc).__name__}: {exc})") from exc
    hu = _validate_hu(np.asarray(arr), p).astype(np.float32)
    low, high = float(hu.min()), float(hu.max())
    if low < high and -1 <= low and high <= 2:  # a real slice spans air (-1000 HU) to tissue; [0, 1] is an image
        raise DataError(
            f"{p}: values lie in [{low:.3g}, {high:.3g}]: a CT .npy slice is read in Hounsfield units (air -1000, "
            "water 0, bone about +1000), and this looks like an image scaled to [0, 1]; convert it to HU first "
            "(for an image windowed to [low, high] HU: hu = low + x * (high - low))"
        )
    if clip_air:
        hu = np.maximum(hu, np.float32(HU_MIN))
    return hu


def _tiff_frames(p: Path) -> tuple[int, int, int]:
    try:
        with Image.open(p) as im:
            return int(getattr(im, "n_frames", 1)), im.size[1], im.size[0]
    except Exception as exc:
        raise DataError(f"{p}: cannot read TIFF ({type(exc).__name__}: {exc})") from exc


def read_tiff_volume(path: PathLike, units: str = "auto") -> np.ndarray:
    """Read a (multi-page) grayscale TIFF into a float32 volume ``(N, H, W)``.

    ``units="intensity"``: raw values divided by the volume maximum -> [0, 1]
    relative intensities (not HU). ``units="hu"``: raw values are HU
    (clipped below at -1024). ``units="hu+1024"``: raw values
    minus 1024 = HU (clipped below at -1024); window them with :func:`hu_window`.
    ``units="display-gamma2"``: raw values are squared display levels,
    calibrated to HU by :func:`display_levels_to_hu` (clipped below at -1024).
    ``units="auto"`` (default): :func:`tiff_units_of` the volume decides.

    Raises :class:`DataError` naming the file if unreadable, truncated, or not
    single-channel.
    """
    return _read_tiff(path, units)[0]


def _read_tiff(path: PathLike, units: str) -> tuple[np.ndarray, str]:
    """:func:`read_tiff_volume`, and the units it used (``"auto"`` resolved)."""
    if units not in TIFF_UNITS:
        raise ValueError(f"units must be one of {TIFF_UNITS}, got {units!r}")
    p = check_file(path)
    frames = []
    try:  # from a file object: Pillow memory-maps a file opened by name, and then mis-turns uncompressed pages
        with open(p, "rb") as handle, Image.open(handle) as im:
            for i in range(int(getattr(im, "n_frames", 1))):
                im.seek(i)
                im.load()
                a = np.asarray(im)
                if a.ndim != 2:
                    raise DataError(f"{p}: page {i} is not single-channel (mode {im.mode})")
                frames.append(a.astype(np.float32))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    if len({f.shape for f in frames}) != 1:
        raise DataError(f"{p}: TIFF pages differ in size")
    vol = np.stack(frames)
    if not np.isfinite(vol).all():
        raise DataError(f"{p}: contains NaN or infinite values")
    if units == "auto":
        units = tiff_units_of(vol)
    if units == "hu":
        return np.maximum(vol, np.float32(HU_MIN)), units
    if units == "hu+1024":
        return np.maximum(vol - np.float32(1024), np.float32(HU_MIN)), units
    if units == "display-gamma2":
        return np.maximum(display_levels_to_hu(np.sqrt(vol), p), np.float32(HU_MIN)), units
    vmax = float(vol.max())
    if vmax <= 0:
        raise DataError(f"{p}: volume is all zeros (cannot normalise intensities)")
    return vol / np.float32(vmax), units


def tiff_units_of(raw: np.ndarray) -> str:
    """``"hu"`` if ``raw`` (any shape, the stored values) holds a value below -500 (air), ``"display-gamma2"`` if
    it holds squared integer display levels whose top is 16..255, else ``"intensity"`` (see the module docstring)."""
    if raw.size and float(raw.min()) < HU_AIR_BELOW:
        return "hu"
    levels = np.rint(np.sqrt(np.maximum(raw, 0)))
    squares = bool((raw >= 0).all() and (levels * levels == raw).all())
    return "display-gamma2" if squares and 16 <= float(levels.max()) <= 255 else "intensity"


def display_levels_to_hu(levels: np.ndarray, source: PathLike = "volume") -> np.ndarray:
    """HU of display levels, linear through air at level 0 and the soft-tissue mode (module docstring).

    ``levels``: float array ``(N, H, W)`` of display levels (``>= 0``), the
    whole volume (the mode is read from all its slices). Returns float32 HU
    of the same shape. Raises :class:`DataError` naming ``source`` when the
    volume has no level above a tenth of its top level to serve as the mode.
    """
    top = float(levels.max())
    rounded = np.rint(levels[levels >= 0.1 * top]).astype(np.int64) if top > 0 else np.zeros(0, np.int64)
    rounded = rounded[rounded > 0]
    if rounded.size == 0:
        raise DataError(f"{source}: no display levels above air to calibrate to HU (units 'display-gamma2')")
    mode = int(np.bincount(rounded).argmax())
    slope = (SOFT_TISSUE_HU - AIR_HU) / mode
    return (np.float32(AIR_HU) + levels * np.float32(slope)).astype(np.float32)


def ct_num_slices(path: PathLike) -> tuple[int, int, int]:
    """``(num_slices, H, W)`` of a CT file (.dcm, .npy, .tif/.tiff), reading headers only."""
    p = check_file(path)
    ext = p.suffix.lower()
    if ext == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{p}: cannot read .npy ({type(exc).__name__}: {exc})") from exc
        _check_slice_shape(arr.shape, p)
        return (1, *map(int, arr.shape)) if arr.ndim == 2 else tuple(map(int, arr.shape))
    if ext in (".tif", ".tiff"):
        return _tiff_frames(p)
    if ext == ".dcm":
        import pydicom

        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as exc:
            raise DataError(f"{p}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
        _check_ct_header(ds, p)
        try:
            return int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns)
        except Exception as exc:
            raise DataError(f"{p}: DICOM header lacks Rows/Columns ({exc})") from exc
    raise DataError(f"{p}: unsupported CT file type (expected {', '.join(CT_EXTENSIONS)})")


def read_ct_slice(
    path: PathLike,
    index: int = 0,
    window: tuple[float, float] = DEFAULT_HU_WINDOW,
    tiff_units: str = "auto",
) -> torch.Tensor:
    """One CT slice as a float32 tensor ``(1, H, W)`` in [0, 1].

    ``.dcm`` / ``.npy`` (and TIFF with ``tiff_units="hu"``, ``"hu+1024"`` or
    ``"display-gamma2"``, or ``"auto"`` choosing one of them) are read in HU and
    mapped with :func:`hu_window` (``window=(low, high)``); a TIFF with
    ``tiff_units="intensity"`` is normalised by its volume maximum instead.
    ``index`` picks the slice of a stack / multi-frame file.
    Raises :class:`DataError` naming the file for unreadable data or an
    out-of-range ``index``.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext == ".dcm":
        vol = read_dicom_hu(p)
    elif ext == ".npy":
        vol = read_npy_hu(p)
    elif ext in (".tif", ".tiff"):
        vol, units = _read_tiff(p, tiff_units)
        if units == "intensity":
            vol = np.clip(vol, 0.0, 1.0)
            window = None  # type: ignore[assignment]
    else:
        raise DataError(f"{p}: unsupported CT file type (expected {', '.join(CT_EXTENSIONS)})")
    if vol.ndim == 2:
        vol = vol[None]
    if not 0 <= index < vol.shape[0]:
        raise DataError(f"{p}: slice index {index} out of range (file has {vol.shape[0]})")
    sl = vol[index]
    if window is not None:
        sl = hu_window(sl, window[0], window[1])
    return torch.from_numpy(np.ascontiguousarray(sl, dtype=np.float32))[None]
