"""fastMRI single-coil ``.h5`` files for ``idm reconstruct``: k-space in, reconstructions out.

Reading uses :func:`tasks.data.load_fastmri_slices` (which refuses files
without ``kspace`` and multi-coil data). The helpers here turn a volume into
measurements of the ``mri`` operator and write the result in fastMRI's layout.

**Normalisation.** The networks are trained on magnitude images in [0, 1],
while raw k-space comes in scanner units (fastMRI: image magnitudes around
1e-4 to 1e-3). The measured k-space of a volume is therefore divided by one
per-volume ``scale``: the largest magnitude of the *zero-filled* image
``|F^H (M k)|`` over all slices of the volume. It is computed from the
measurements alone (no ground truth), the same for every slice of a volume
(so relative intensities between slices are kept), and it puts the
zero-filled magnitudes in [0, 1] (the fully sampled image peaks close to 1).
The reconstruction is multiplied back by ``scale`` before it is written, so
``reconstruction`` is in the units of the file (comparable with
``reconstruction_esc``).

**Output** (:func:`write_reconstruction_h5`): ``reconstruction`` float32
``(slices, h, w)`` magnitude, centre-cropped like fastMRI does -- to the size
of ``reconstruction_esc`` when the file has one, else to the ismrmrd header's
reconstruction matrix (320 x 320 for the public data) when it fits, else the
full k-space size -- plus ``mask`` (the ``(W,)`` boolean columns used) and
attributes (the input's, and ``idm_*`` provenance). fastMRI's
``evaluate.py`` reads such files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from tasks.data import DataError, FastMRISlices, kspace_to_image

__all__ = ["file_mask_columns", "volume_scale", "slice_measurements", "output_crop", "reference_volume", "write_reconstruction_h5"]

PathLike = Union[str, os.PathLike]


def file_mask_columns(volume: FastMRISlices) -> Optional[torch.Tensor]:
    """The file's ``mask`` as ``(W,)`` 0/1 float64 columns, or ``None`` when the file has none.

    Accepts fastMRI's ``(W,)`` mask and masks that broadcast to whole columns
    (``(1, W)``, ``(H, W)`` with equal rows, ``(W, 1)`` after squeezing).
    Raises :class:`DataError` naming the file otherwise.
    """
    if volume.mask is None:
        return None
    width = int(volume.kspace.shape[-1])
    mask = volume.mask.to(torch.bool)
    if mask.dim() == 2 and mask.shape[-1] == width and bool((mask == mask[:1]).all()):
        mask = mask[0]
    mask = mask.squeeze()  # (1, W), (W, 1), (1, 1, W): one column each; (2, W / 2) stays two-dimensional: refused
    if mask.dim() != 1 or mask.numel() != width:
        raise DataError(
            f"{volume.path}: 'mask' has shape {tuple(volume.mask.shape)}; expected the {width} sampled "
            f"k-space columns (W,) of the kspace of shape {tuple(volume.kspace.shape)}"
        )
    if not bool(mask.any()):
        raise DataError(f"{volume.path}: 'mask' samples no k-space column")
    return mask.to(torch.float64)


def volume_scale(kspace: torch.Tensor, columns: torch.Tensor, source: str = "k-space") -> float:
    """The per-volume normalisation: max ``|F^H (M k)|`` over all slices (see the module docstring).

    ``source`` (the file) begins the :class:`DataError` raised for NaN/inf or all-zero measured k-space.
    """
    masked = kspace * columns.to(kspace.real.dtype)
    scale = float(kspace_to_image(masked, crop=None, magnitude=True).max())
    if not np.isfinite(scale):
        raise DataError(f"{source}: k-space contains NaN or inf")
    if scale <= 0:
        raise DataError(f"{source}: the measured k-space is all zeros")
    return scale


def slice_measurements(kspace: torch.Tensor, columns: torch.Tensor, scale: float) -> torch.Tensor:
    """``(S, H, W)`` complex k-space -> ``(S, 2, H, W)`` float32 ``mri`` measurements (masked, divided by ``scale``)."""
    k = kspace.to(torch.complex64) * columns.to(torch.float32) / scale
    return torch.stack((k.real, k.imag), dim=1).contiguous()


def output_crop(volume: FastMRISlices) -> Optional[tuple[int, int]]:
    """fastMRI's crop: the size of ``reconstruction_esc``, else the header's reconstruction size if it fits, else ``None``."""
    height, width = (int(s) for s in volume.kspace.shape[-2:])
    if volume.reconstruction_esc is not None:
        h, w = (int(s) for s in volume.reconstruction_esc.shape[-2:])
    elif volume.recon_size is not None:
        h, w = int(volume.recon_size[0]), int(volume.recon_size[1])
    else:
        return None
    if 0 < h <= height and 0 < w <= width:
        return h, w
    return None


def reference_volume(volume: FastMRISlices, has_file_mask: bool, crop: Optional[tuple[int, int]]) -> tuple[Optional[torch.Tensor], str]:
    """The ground truth to score against, ``(S, h, w)`` float32, and what it is.

    ``reconstruction_esc`` when the file has it; else, for a fully sampled file
    (no ``mask``), the magnitude of its full k-space image (cropped like the
    output); else ``(None, "")``.
    """
    if volume.reconstruction_esc is not None:  # one per slice, fitting the k-space image: load_fastmri_slices checks
        return volume.reconstruction_esc.to(torch.float32), "reconstruction_esc"
    if not has_file_mask:
        return kspace_to_image(volume.kspace, crop=crop, magnitude=True).to(torch.float32), "fully sampled k-space"
    return None, ""


def _attr_value(value: Any) -> Any:
    if isinstance(value, (str, bytes, int, float, bool, np.generic)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    return json.dumps(value, default=str)


def write_reconstruction_h5(
    path: PathLike,
    reconstruction: np.ndarray,
    columns: torch.Tensor,
    attrs: dict[str, Any],
) -> Path:
    """Write ``reconstruction`` ``(S, h, w)`` float32 and ``mask`` ``(W,)`` bool to ``path`` (atomically)."""
    import h5py

    from tasks.measurements import atomic_write

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("reconstruction", data=np.ascontiguousarray(reconstruction, dtype=np.float32))
            f.create_dataset("mask", data=columns.cpu().numpy() != 0)
            for key, value in attrs.items():
                if value is not None:
                    f.attrs[key] = _attr_value(value)

    return atomic_write(path, write)
