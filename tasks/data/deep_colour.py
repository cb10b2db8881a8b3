"""Colour images of more than 8 bits per channel, which Pillow reduces to 8.

Pillow keeps 16-bit *grey* images at full precision (mode ``I;16``), but it decodes 16-bit RGB, RGBA and grey +
alpha PNGs and 16-bit RGB(A) TIFFs as 8-bit images. :func:`read_deep_colour` reads those files at their full
depth instead: PNGs with torchvision's decoder (``torchvision.io.decode_png``, which returns ``uint16`` for 16-bit
files), TIFFs with ``tifffile``. A TIFF compressed by a codec that ``tifffile`` cannot decode without the optional
``imagecodecs`` package (LZW, JPEG, ...), or a PNG once torchvision no longer has its deprecated decoder, gives
``None``, and the caller falls back to Pillow's 8 bits, with a warning. Other TIFFs (CMYK, YCbCr, palette) stay
Pillow's, which converts them to RGB; a 16-bit grey + alpha TIFF Pillow cannot open at all.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .errors import DataError

__all__ = ["deep_colour_format", "read_deep_colour", "apply_exif_orientation"]

#: PNG colour types that hold several channels: grey + alpha, RGB, RGBA (2 and 6 are colour, 4 is grey + alpha).
_PNG_MULTICHANNEL = (2, 4, 6)


def deep_colour_format(im: Image.Image, path: Path) -> Optional[str]:
    """``"png"`` or ``"tiff"`` when the opened (not yet decoded) image ``im`` of ``path`` stores several channels of
    more than 8 bits each, which Pillow would reduce to 8 bits; ``None`` otherwise (header fields only)."""
    if im.format == "PNG":
        with open(path, "rb") as handle:
            header = handle.read(26)  # signature, IHDR length and type, width, height, bit depth, colour type
        deep = len(header) == 26 and header[24] > 8 and header[25] in _PNG_MULTICHANNEL
        return "png" if deep else None
    if im.format == "TIFF":
        tags = getattr(im, "tag_v2", {})
        bits = tags.get(258, ())  # BitsPerSample, one per channel
        bits = bits if isinstance(bits, tuple) else (bits,)
        rgb = tags.get(262) == 2  # PhotometricInterpretation RGB (CMYK, YCbCr: Pillow converts them)
        return "tiff" if rgb and any(b > 8 for b in bits) else None
    return None


def read_deep_colour(path: Path, kind: str) -> Optional[np.ndarray]:
    """Pixels of a deep colour file (``kind`` from :func:`deep_colour_format`), upright by its EXIF orientation:
    ``(H, W, 3)`` for colour or ``(H, W)`` for grey + alpha, ``uint16`` (full scale 65535), alpha dropped.

    ``None`` when no decoder here reads the file at full depth (a TIFF compression that needs ``imagecodecs``; a
    torchvision without ``decode_png``). Raises :class:`DataError` naming the file when it is truncated or
    corrupt."""
    try:
        channels_last = _read_png16(path) if kind == "png" else _read_tiff_first_page(path)
    except _CodecMissing:
        return None
    except DataError:
        raise
    except Exception as exc:  # the decoders raise RuntimeError, ValueError, OSError, ...
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if channels_last.dtype != np.uint16:
        raise DataError(f"{path}: {channels_last.dtype} samples of more than 8 bits are not supported "
                        "(16-bit unsigned are)")  # fmt: skip
    colour = channels_last.shape[-1] >= 3
    return np.ascontiguousarray(channels_last[..., :3] if colour else channels_last[..., 0])


class _CodecMissing(Exception):
    """The TIFF's compression needs a codec that is not installed."""


def _read_png16(path: Path) -> np.ndarray:
    import torch

    try:  # deprecated since torchvision 0.29 in favour of TorchCodec; without it, Pillow's 8 bits (with a warning)
        from torchvision.io import ImageReadMode, decode_png
    except ImportError as exc:
        raise _CodecMissing(str(exc)) from exc
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)  # fmt: skip
        decoded = decode_png(data, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)  # (C, H, W), uint16
    return decoded.permute(1, 2, 0).numpy().astype(np.uint16)


def _read_tiff_first_page(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        try:
            pixels = page.asarray()
        except (KeyError, ValueError) as exc:
            if "imagecodecs" in str(exc):
                raise _CodecMissing(str(exc)) from exc
            raise
        axes = page.axes
        orientation = page.tags.valueof(274, 1)  # Orientation
    pixels = pixels[..., None] if "S" not in axes else np.moveaxis(pixels, axes.index("S"), -1)  # planar: samples first
    return apply_exif_orientation(pixels, int(orientation))


def apply_exif_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """``pixels`` ``(H, W, ...)`` turned upright for the EXIF orientation code 1-8, as ``PIL.ImageOps.exif_transpose``
    turns an image (tested against it)."""
    turns = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    turn = turns.get(orientation)
    return pixels if turn is None else np.ascontiguousarray(turn(pixels))
