"""Reading fastMRI single-coil ``.h5`` files (h5py) and turning k-space into images.

fastMRI single-coil layout: ``kspace`` (num_slices, H, W) complex64,
optionally ``reconstruction_esc`` (num_slices, 320, 320) float32 magnitude
images, optionally ``mask`` (W,) of sampled columns (test/challenge files),
an ``ismrmrd_header`` XML string with the encoded and reconstruction matrix
sizes, and file attributes (``acquisition``, ``max``, ``norm``, ...).

The image convention is fastMRI's: the centred, orthonormal 2-D inverse FFT
``fftshift(ifft2(ifftshift(k), norm="ortho"))`` over the last two axes,
magnitude, centre-cropped to the reconstruction size (320 x 320 for fastMRI).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import h5py
import numpy as np
import torch

from .errors import DataError, check_file

__all__ = [
    "FastMRISlices", "check_fully_sampled", "check_single_coil", "load_fastmri_slices", "kspace_to_image", "parse_ismrmrd_sizes",
    "read_kspace_slice",
]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class FastMRISlices:
    """Contents of one fastMRI single-coil file.

    Attributes:
        path: the file.
        kspace: complex64 tensor ``(num_slices, H, W)``.
        reconstruction_esc: float32 tensor ``(num_slices, h, w)`` (magnitude
            images, typically 320 x 320), or None if absent.
        mask: bool tensor of the stored ``mask`` (usually ``(W,)``, the sampled
            k-space columns), or None if absent.
        encoded_size: ``(x, y, z)`` of the ismrmrd encoded space, or None.
        recon_size: ``(x, y, z)`` of the ismrmrd reconstruction space, or None.
        attrs: the file's HDF5 attributes (acquisition, max, norm, ...).
    """

    path: Path
    kspace: torch.Tensor
    reconstruction_esc: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    encoded_size: Optional[tuple[int, int, int]] = None
    recon_size: Optional[tuple[int, int, int]] = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return int(self.kspace.shape[0])


def parse_ismrmrd_sizes(
    header: Union[bytes, str],
) -> tuple[Optional[tuple[int, int, int]], Optional[tuple[int, int, int]]]:
    """``(encoded_size, recon_size)`` as ``(x, y, z)`` from an ismrmrd XML header.

    Either is None when it cannot be parsed (no exception is raised).
    """
    try:
        root = ET.fromstring(header)
    except Exception:
        return None, None

    def size(space: str) -> Optional[tuple[int, int, int]]:
        # ignore XML namespaces: match on local tag names
        for el in root.iter():
            if el.tag.split("}")[-1] == space:
                for sub in el:
                    if sub.tag.split("}")[-1] == "matrixSize":
                        vals = {c.tag.split("}")[-1]: c.text for c in sub}
                        try:
                            return int(vals["x"]), int(vals["y"]), int(vals.get("z") or 1)
                        except (KeyError, TypeError, ValueError):
                            return None
        return None

    return size("encodedSpace"), size("reconSpace")


def _reference_images(ds: h5py.Dataset, kspace_shape: tuple[int, ...], p: Path) -> torch.Tensor:
    """``reconstruction_esc`` as float32 ``(slices, h, w)``, checked against the k-space ``(slices, H, W)``:
    one image per slice, no larger than the k-space image (fastMRI crops it from there), finite numbers."""
    if ds.dtype.kind not in "iuf" or ds.ndim != 3:
        raise DataError(f"{p}: reconstruction_esc must be real images (slices, h, w), got dtype {ds.dtype} of shape {ds.shape}")
    if ds.shape[0] != kspace_shape[0]:
        raise DataError(f"{p}: reconstruction_esc has {ds.shape[0]} slices, kspace {kspace_shape[0]}")
    if 0 in ds.shape:
        raise DataError(f"{p}: reconstruction_esc is empty (shape {ds.shape})")
    if ds.shape[1] > kspace_shape[1] or ds.shape[2] > kspace_shape[2]:
        raise DataError(f"{p}: reconstruction_esc images are {ds.shape[1]}x{ds.shape[2]}; they must fit in the "
                        f"{kspace_shape[1]}x{kspace_shape[2]} k-space image, from which they are cropped")  # fmt: skip
    images = np.ascontiguousarray(ds[()], dtype=np.float32)
    if not np.isfinite(images).all():
        raise DataError(f"{p}: reconstruction_esc holds NaN or infinite values")
    return torch.from_numpy(images)


def _open_single_coil(p: Path) -> h5py.File:
    """``p`` opened for reading, its ``kspace`` (and ``reconstruction_esc``, ``mask``, where present) checked to be
    datasets and k-space to be single-coil complex ``(slices, H, W)``; a :class:`DataError` naming ``p`` otherwise.
    The caller closes the file."""
    try:
        f = h5py.File(p, "r")
    except Exception as exc:
        raise DataError(f"{p}: not a readable HDF5 file ({exc})") from exc
    try:
        if "kspace" not in f:
            raise DataError(f"{p}: no 'kspace' dataset (found: {', '.join(sorted(f.keys())) or 'nothing'})")
        for name in ("kspace", "reconstruction_esc", "mask"):
            if name in f and not isinstance(f[name], h5py.Dataset):
                raise DataError(f"{p}: '{name}' is an HDF5 {type(f[name]).__name__.lower()}, not a dataset")
        ds = f["kspace"]
        if ds.dtype.kind != "c":  # before the shape: (S, H, W, 2) real pairs are not multi-coil data
            raise DataError(f"{p}: kspace must be complex (fastMRI stores complex64), got dtype {ds.dtype} of shape {ds.shape}")
        if ds.ndim == 4:
            raise DataError(f"{p}: kspace has shape {ds.shape} (slices, coils, H, W): "
                            "multi-coil data is not supported yet (single-coil only)")  # fmt: skip
        if ds.ndim != 3 or 0 in ds.shape:
            raise DataError(f"{p}: kspace must have shape (slices, H, W) with no empty axis, got {ds.shape}")
    except BaseException:
        f.close()
        raise
    return f


def check_single_coil(path: PathLike) -> tuple[int, int, int]:
    """``(slices, H, W)`` of a fastMRI single-coil file's k-space, read from its header without loading it; the
    :class:`DataError` of :func:`load_fastmri_slices` for a file it would refuse so (no k-space, multi-coil, ...).
    For checking every file of a folder before the first is reconstructed."""
    with _open_single_coil(check_file(path)) as f:
        return tuple(int(n) for n in f["kspace"].shape)


def check_fully_sampled(path: PathLike) -> tuple[int, int, int]:
    """``(slices, H, W)`` of a fastMRI single-coil file whose k-space is fully sampled, read from its header.

    Besides the refusals of :func:`check_single_coil`, a :class:`DataError` naming the file when it stores a
    ``mask`` (fastMRI's test and challenge files): their k-space is undersampled, so they hold no fully
    sampled image to serve as a ground truth (``idm reconstruct`` reconstructs them).
    """
    p = check_file(path)
    with _open_single_coil(p) as f:
        if "mask" in f:
            raise DataError(f"{p}: holds a 'mask', so its k-space is undersampled and has no fully sampled image to "
                            f"score or train against; reconstruct it with `idm reconstruct --task mri --input {p}`")  # fmt: skip
        return tuple(int(n) for n in f["kspace"].shape)


def read_kspace_slice(path: PathLike, index: int) -> torch.Tensor:
    """Slice ``index`` of a single-coil file's k-space, complex64 ``(H, W)``, read alone (not the whole volume).

    The :class:`DataError` of :func:`check_single_coil` for a file it refuses; one naming the file for a slice
    that is not there or cannot be read.
    """
    p = check_file(path)
    with _open_single_coil(p) as f:
        ds = f["kspace"]
        if not 0 <= index < ds.shape[0]:
            raise DataError(f"{p}: no k-space slice {index} (the file has {ds.shape[0]})")
        try:
            return torch.from_numpy(np.ascontiguousarray(ds[index], dtype=np.complex64))
        except Exception as exc:
            raise DataError(f"{p}: cannot read k-space slice {index} ({type(exc).__name__}: {exc})") from exc


def load_fastmri_slices(path: PathLike) -> FastMRISlices:
    """Load a fastMRI **single-coil** ``.h5`` file.

    Returns a :class:`FastMRISlices` with k-space ``(num_slices, H, W)``
    complex64 and, when present, ``reconstruction_esc``, ``mask`` and the
    header sizes.

    Raises :class:`DataError` naming the file when it is missing or not HDF5,
    has no ``kspace``, holds multi-coil data (kspace of 4 dims), or k-space is
    not a complex array of shape (slices, H, W); when ``reconstruction_esc``
    is not one finite image per slice that fits in the k-space image, or
    ``mask`` does not hold numbers.
    """
    p = check_file(path)
    with _open_single_coil(p) as f:
        ds = f["kspace"]
        try:
            kspace = torch.from_numpy(np.ascontiguousarray(ds[()], dtype=np.complex64))
            recon = None
            if "reconstruction_esc" in f:
                recon = _reference_images(f["reconstruction_esc"], tuple(kspace.shape), p)
            mask = None
            if "mask" in f:
                stored = np.asarray(f["mask"][()])
                if stored.dtype.kind not in "biuf":
                    raise DataError(f"{p}: 'mask' must hold numbers (0/1 or booleans), got dtype {stored.dtype}")
                mask = torch.from_numpy(stored != 0)
            encoded, recon_size = (None, None)
            if "ismrmrd_header" in f:
                encoded, recon_size = parse_ismrmrd_sizes(f["ismrmrd_header"][()])
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{p}: cannot read data ({type(exc).__name__}: {exc})") from exc
    return FastMRISlices(
        path=p, kspace=kspace, reconstruction_esc=recon, mask=mask,
        encoded_size=encoded, recon_size=recon_size, attrs=attrs,
    )


def kspace_to_image(
    kspace: torch.Tensor,
    crop: Optional[tuple[int, int]] = (320, 320),
    magnitude: bool = True,
) -> torch.Tensor:
    """Image of k-space by fastMRI's convention.

    ``kspace``: complex tensor ``(..., H, W)`` (centre of k-space in the
    middle). Computes ``fftshift(ifft2(ifftshift(k), norm="ortho"))`` over the
    last two axes, centre-crops to ``crop`` (``(h, w)``; None keeps the full
    size; a crop larger than the image is an error) and returns the magnitude
    (float, ``(..., h, w)``) or, with ``magnitude=False``, the complex image.
    Raises :class:`ValueError` naming ``kspace`` / ``crop`` for bad input.
    """
    if not isinstance(kspace, torch.Tensor) or not torch.is_complex(kspace):
        raise ValueError("kspace must be a complex torch.Tensor")
    if kspace.ndim < 2:
        raise ValueError(f"kspace must have shape (..., H, W), got {tuple(kspace.shape)}")
    dims = (-2, -1)
    img = torch.fft.fftshift(
        torch.fft.ifft2(torch.fft.ifftshift(kspace, dim=dims), norm="ortho"), dim=dims
    )
    if crop is not None:
        h, w = int(crop[0]), int(crop[1])
        H, W = img.shape[-2:]
        if h > H or w > W or h <= 0 or w <= 0:
            raise ValueError(f"crop {(h, w)} does not fit the image of size {(H, W)}")
        top, left = (H - h) // 2, (W - w) // 2
        img = img[..., top:top + h, left:left + w]
    return img.abs() if magnitude else img
