"""Reading image files (PNG, TIFF, BMP, JPEG) into float tensors in [0, 1].

Colour conventions (``color`` argument of :func:`read_image`):

``"rgb"``
    3 channels R, G, B. Grayscale sources are replicated to 3 channels.
``"gray"``
    1 channel, luminance ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601 luma
    weights) computed in floating point, without rounding. Grayscale sources
    are returned unchanged.
``"y"``
    1 channel, the Y (luma) channel of **full-range** ITU-R BT.601 YCbCr, in
    [0, 1]: the same weights as ``"gray"``, i.e. what OpenCV's
    ``cv2.cvtColor(img, cv2.COLOR_BGR2YCrCb)`` (and JPEG/JFIF) computes, which
    is what the IDM authors' test script evaluates on. For 8-bit sources the
    value is computed with OpenCV's exact fixed-point arithmetic
    ``(4899 R + 9617 G + 1868 B + 8192) >> 14`` and so lies on the 8-bit grid
    ``k / 255``, exactly as the uint8 Y channel of the paper's protocol. For
    16-bit sources no rounding is applied. A gray pixel keeps its value
    (the weights sum to 1). This is NOT Matlab's studio-range ``rgb2ycbcr``
    (Y in [16, 235] / 255); that one relates by ``Y_full = (Y_studio - 16) / 219``
    (with Y_studio on the 0..255 scale).

Palette ("P") images are expanded through their palette to RGB first (RGBA
when they carry transparency; alpha channels are dropped, not composited), and
only then converted to gray / Y. Multi-page TIFFs give their first page.
8-bit data is divided by 255, 16-bit data by 65535. 16-bit colour (and grey +
alpha) PNGs and 16-bit RGB(A) TIFFs, which Pillow reduces to 8 bits per channel,
are read at full precision by :mod:`tasks.data.deep_colour`.
32-bit float ("F") TIFFs are accepted if their values lie in [0, 1].

Truncated files raise :class:`DataError` because Pillow's ``load()`` does;
this detection is lost if some other code sets the global
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .deep_colour import deep_colour_format, read_deep_colour
from .errors import DataError, check_file

__all__ = [
    "IMAGE_EXTENSIONS",
    "COLOR_MODES",
    "list_files",
    "list_images",
    "read_image",
    "image_size",
    "rgb_to_y",
]

PathLike = Union[str, os.PathLike]

#: File name endings (lower case) recognised as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
#: Accepted values of the ``color`` argument.
COLOR_MODES: tuple[str, ...] = ("gray", "y", "rgb")

# ITU-R BT.601 luma weights, and OpenCV's 14-bit fixed-point versions of them.
_LUMA = (0.299, 0.587, 0.114)
_LUMA_FIXED = (4899, 9617, 1868)


#: Suffixes of fastMRI k-space files, and what to tell a user who gives them where images are read.
KSPACE_SUFFIXES = (".h5", ".hdf5")
#: What the toolkit's readers of every kind take (images, CT slices, MATLAB files, k-space): a folder's files of
#: these suffixes that a listing of another kind leaves out are named in a warning.
DATA_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".npy", ".dcm", ".mat", *KSPACE_SUFFIXES)
#: What the data files of :data:`DATA_SUFFIXES` other than images hold, for messages.
OTHER_KINDS = {".npy": "CT slices (.npy)", ".dcm": "DICOM slices", ".mat": "MATLAB matrices", ".h5": "fastMRI k-space",
               ".hdf5": "fastMRI k-space"}  # fmt: skip
KSPACE_HINT = ("; fastMRI .h5 files hold measured k-space, not images: `idm reconstruct --input FILE.h5` "
               "reconstructs them and scores them against their reconstruction_esc, and the mri task's "
               "`idm benchmark` and `idm train` read fully sampled ones as complex images")


def list_files(
    folder: PathLike,
    extensions: Iterable[str],
    recursive: bool = False,
    what: str = "data",
) -> list[Path]:
    """Sorted files of ``folder`` whose names end with one of ``extensions``.

    Matching is case-insensitive; hidden files (name starting with ".") are
    skipped. With ``recursive=True`` sub-folders are searched too. The result
    is sorted by path. Raises :class:`DataError` naming the folder when it does
    not exist, is not a folder, or holds no matching file (``what`` names the
    kind of file in that message, e.g. "image").
    """
    root = Path(folder)
    if not root.exists():
        raise DataError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    exts = tuple(e.lower() for e in extensions)
    candidates = list(root.rglob("*") if recursive else root.iterdir())
    files = sorted(
        p for p in candidates
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(exts)
    )
    # sub-folders that hold such files themselves, which a folder's listing leaves out: said, not used silently
    # (one level down: a deeper tree is not walked at every call)
    skipped = [] if recursive else sorted(
        p.name for p in candidates if p.is_dir() and not p.name.startswith(".") and _holds_files(p, exts)
    )  # fmt: skip
    unsearched = (f"sub-folder{'s' if len(skipped) > 1 else ''} {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}"
                  " (sub-folders are not searched: give them as paths too)")  # fmt: skip
    others = sorted(p for p in candidates if p.name.lower().endswith(DATA_SUFFIXES)
                    and not p.name.lower().endswith(exts) and not p.name.startswith(".") and p.is_file())  # fmt: skip
    kinds = " and ".join(sorted({OTHER_KINDS.get(p.suffix.lower(), "images") for p in others}))
    hint = KSPACE_HINT if any(p.suffix.lower() in KSPACE_SUFFIXES for p in others) else ""
    if not files:
        where = " (searched recursively)" if recursive else ""
        raise DataError(
            f"{root}: no {what} files{where} with extensions {', '.join(exts)}"
            + (f"; the {what} files are in its {unsearched}" if skipped else "")
            + (f"; it holds {kinds}, which another task or data kind reads{hint}" if others else "")
        )
    if skipped:
        warnings.warn(f"{root}: its {unsearched} also hold {what} files, which are not used", stacklevel=2)
    if others:
        warnings.warn(f"{root}: {len(others)} file(s) of another kind than {what} files are not read "
                      f"({', '.join(p.name for p in others[:3])}{', ...' if len(others) > 3 else ''}): "
                      f"{kinds}, which another task or data kind reads{hint}", stacklevel=2)  # fmt: skip
    return files


def _holds_files(folder: Path, extensions: tuple[str, ...]) -> bool:
    """Whether ``folder`` itself holds a file of ``extensions`` (an unreadable folder holds none we can use)."""
    return bool(files_in(folder, extensions))


def files_in(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """The files of ``folder`` (not its sub-folders) named with one of ``extensions`` (lower case), sorted,
    hidden ones left out as :func:`list_files` leaves them (macOS's ``._scan.h5`` beside ``scan.h5`` is no
    scan); empty for a folder that holds none or cannot be read."""
    try:
        return sorted(f for f in folder.iterdir()
                      if f.name.lower().endswith(extensions) and not f.name.startswith(".") and f.is_file())  # fmt: skip
    except OSError:
        return []


def warn_of_multipage_tiffs(files: Iterable[Path]) -> None:
    """One warning naming the TIFF files among ``files`` that hold several pages, of which an image reader takes
    the first (a CT volume is read page by page by the ct task); only their headers are read."""
    multipage = []
    for path in files:
        if Path(path).suffix.lower() in (".tif", ".tiff"):
            try:
                with Image.open(path) as im:
                    if getattr(im, "n_frames", 1) > 1:
                        multipage.append(Path(path).name)
            except (OSError, ValueError):  # unreadable: reading it says so
                continue
    if multipage:
        warnings.warn(f"{len(multipage)} TIFF file(s) hold several pages, of which only the first is read as an image "
                      f"({', '.join(multipage[:3])}{', ...' if len(multipage) > 3 else ''}); the ct task and "
                      "`idm pretrain --data-kind ct` read a CT volume page by page", stacklevel=3)  # fmt: skip


def list_images(folder: PathLike, recursive: bool = False) -> list[Path]:
    """Sorted image files (see :data:`IMAGE_EXTENSIONS`) in ``folder``.

    Raises :class:`DataError` naming the folder if it is missing or holds no image.
    """
    return list_files(folder, IMAGE_EXTENSIONS, recursive=recursive, what="image")


def image_size(path: PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file, as :func:`read_image` gives it: read from its header, except
    that an image with a 90-degree EXIF orientation (5-8) is decoded to turn it (Pillow reports the turned
    size of some formats already, TIFF's, and not of others).

    Raises :class:`DataError` naming the file if it cannot be identified.
    """
    p = check_file(path)
    try:  # from a file object, as read_image opens it (Pillow turns a memory-mapped TIFF page otherwise)
        with open(p, "rb") as handle, Image.open(handle) as im:
            w, h = im.size
            if _exif_orientation(im) in (5, 6, 7, 8):  # 90-degree EXIF rotations: the size read_image gives,
                w, h = ImageOps.exif_transpose(im).size  # which Pillow reports rotated already for some formats (TIFF)
    except Exception as exc:  # Pillow raises many exception types
        raise DataError(f"{p}: cannot read image header ({exc})") from exc
    return h, w


def _white_is_zero(im: Image.Image) -> bool:
    """A TIFF page whose photometric interpretation is MINISWHITE (0 is white) in a mode that Pillow does not
    invert itself (16-bit, 32-bit integer, float; it inverts 1- and 8-bit pages)."""
    tags = getattr(im, "tag_v2", None)
    return tags is not None and tags.get(262) == 0 and (im.mode.startswith("I;16") or im.mode in ("I", "F"))


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _to_array(im: Image.Image, path: Path) -> tuple[np.ndarray, int]:
    """Pixel array (H, W) or (H, W, 3) and its full-scale value (255, 65535 or 1)."""
    mode = im.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    if mode == "1":
        im = im.convert("L")
        mode = "L"
    if mode == "L":
        return np.asarray(im, dtype=np.uint8), 255
    if mode == "LA":
        return np.asarray(im, dtype=np.uint8)[..., 0], 255
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8), 255
    if mode == "RGBA":
        return np.asarray(im, dtype=np.uint8)[..., :3], 255
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8), 255
    if mode.startswith("I;16"):
        arr = np.asarray(im)
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            raise DataError(f"{path}: signed 16-bit image with negative values")
        return arr.astype(np.uint16), 65535
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(
                f"{path}: 32-bit integer image with values outside 0..65535 "
                "(cannot tell its bit depth)"
            )
        return arr.astype(np.uint16), 65535
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{path}: float image contains NaN or infinity")
        if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            raise DataError(
                f"{path}: float image values in [{arr.min():g}, {arr.max():g}], "
                "expected [0, 1]"
            )
        return arr, 1
    raise DataError(f"{path}: unsupported image mode {mode!r}")


def _y_fixed_point(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's uint8 BT.601 Y: ``(4899 R + 9617 G + 1868 B + 8192) >> 14``."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    wr, wg, wb = _LUMA_FIXED
    return ((wr * r + wg * g + wb * b + 8192) >> 14).astype(np.uint8)


def read_image(path: PathLike, color: str = "rgb") -> torch.Tensor:
    """Read an image file into a float32 tensor ``(C, H, W)`` with values in [0, 1].

    ``color`` is ``"rgb"`` (C=3), ``"gray"`` (C=1, float luminance) or
    ``"y"`` (C=1, full-range BT.601 Y as OpenCV computes it); see the module
    docstring for the exact conventions. EXIF orientation tags are applied.

    Raises :class:`DataError` naming the file when it is missing, not an
    image, truncated or otherwise unreadable; :class:`ValueError` for a bad
    ``color``.
    """
    if color not in COLOR_MODES:
        raise ValueError(f"color must be one of {COLOR_MODES}, got {color!r}")
    p = check_file(path)
    try:  # from a file object: Pillow memory-maps a file opened by name, and then mis-turns uncompressed TIFF pages
        with open(p, "rb") as handle, Image.open(handle) as im:
            deep = deep_colour_format(im, p)  # several channels of 16 bits, which Pillow would reduce to 8
            arr = read_deep_colour(p, deep) if deep else None  # upright by its EXIF orientation
            if arr is not None:
                full_scale = 65535
            else:
                im.load()  # decodes now: raises for truncated / corrupt data
                inverted = _white_is_zero(im)  # read before the transpose, which drops the TIFF tags
                if _exif_orientation(im) != 1:
                    im = ImageOps.exif_transpose(im)
                arr, full_scale = _to_array(im, p)
                if inverted:
                    arr = full_scale - arr
            if deep and arr.dtype == np.uint8:
                hint = ("its compression needs the imagecodecs package, which is not installed (pip install imagecodecs "
                        "reads it at full precision)") if deep == "tiff" else "this torchvision has no PNG decoder"
                warnings.warn(f"{p.name}: a 16-bit colour {deep.upper()} read at 8 bits per channel by Pillow: {hint}",
                              stacklevel=2)  # fmt: skip
    except DataError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"{p}: cannot read image ({type(exc).__name__}: {exc})") from exc

    if arr.ndim == 2:  # single-channel source
        gray = arr.astype(np.float32) / np.float32(full_scale)
        out = np.repeat(gray[None], 3, axis=0) if color == "rgb" else gray[None]
    else:
        rgb = arr.astype(np.float32) / np.float32(full_scale)
        if color == "rgb":
            out = np.ascontiguousarray(rgb.transpose(2, 0, 1))
        elif color == "y" and arr.dtype == np.uint8:
            out = (_y_fixed_point(arr).astype(np.float32) / np.float32(255))[None]
        else:
            wr, wg, wb = _LUMA
            out = (wr * rgb[..., 0] + wg * rgb[..., 1] + wb * rgb[..., 2])[None]
            out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """Full-range BT.601 luma of an RGB tensor ``(..., 3, H, W)`` -> ``(..., 1, H, W)``.

    ``Y = 0.299 R + 0.587 G + 0.114 B`` in floating point (no 8-bit rounding),
    so values in [0, 1] map to [0, 1]. Equals ``(Y_studio - 16) / 219`` for
    scikit-image's / Matlab's studio-range ``rgb2ycbcr`` (0..255 scale).
    Raises :class:`ValueError` naming ``x`` for a wrong shape or NaN values.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"x must have shape (..., 3, H, W), got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError("x contains NaN values")
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * w).sum(dim=-3, keepdim=True)
