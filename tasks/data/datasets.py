"""``torch.utils.data.Dataset`` classes for image, MATLAB, fastMRI k-space and CT data.

Every dataset returns one float32 tensor ``(C, H, W)`` per item
(``(C, crop_h, crop_w)`` when ``crop`` is set), with values in [0, 1] but for
:class:`FastMRIImageDataset`'s complex images (real and imaginary parts in
[-1, 1], magnitude in [0, 1]).

Determinism: random crops and dihedral augmentations of item ``i`` are drawn
from a fresh :class:`torch.Generator` seeded from ``(seed, epoch, i)``, so an
item is the same whatever the DataLoader's worker count or order and no
global RNG state is read or changed. Call :meth:`set_epoch` once per epoch to
get new crops (with ``persistent_workers=True`` the workers keep the epoch
they were started with).

``crop``: when set, images smaller than the crop are skipped with a warning;
if no image is large enough, the constructor raises :class:`DataError`. Without
``crop`` images keep their own size (batching then needs equal sizes).
``augment``: one of the 8 dihedral transforms, drawn uniformly; for non-square
outputs only the 4 shape-preserving ones (identity, 180-degree rotation, flips).
"""

from __future__ import annotations

import bisect
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .ct_slices import CT_EXTENSIONS, DEFAULT_HU_WINDOW, TIFF_UNITS, check_window, ct_num_slices, read_ct_slice
from .errors import DataError
from .fastmri_h5 import check_fully_sampled, kspace_to_image, read_kspace_slice
from .images import (
    COLOR_MODES, IMAGE_EXTENSIONS, KSPACE_HINT, KSPACE_SUFFIXES, files_in, image_size, list_files, read_image, warn_of_multipage_tiffs,
)
from .matlab import MAT_EXTENSIONS, load_mat, mat_array_shape
from .transforms import _size, random_crop, random_dihedral

__all__ = [
    "ImageFolderDataset", "MatFolderDataset", "CTSliceDataset", "FastMRIImageDataset", "ConcatSlices", "grayscale_dataset",
    "holds_mat_files", "holds_kspace_files",
]

PathLike = Union[str, os.PathLike]
PathsArg = Union[PathLike, Sequence[PathLike]]


def _collect(paths: PathsArg, extensions: tuple[str, ...], recursive: bool, what: str) -> list[Path]:
    """Files named in ``paths`` (folders are listed, files checked), in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DataError(f"no {what} paths given")
    files: list[Path] = []
    for entry in paths:
        p = Path(entry)
        if p.is_dir():
            files.extend(list_files(p, extensions, recursive=recursive, what=what))
        elif p.is_file():
            if not p.name.lower().endswith(extensions):
                article = "an" if what[:1].lower() in "aeiou" else "a"
                hint = KSPACE_HINT if p.suffix.lower() in KSPACE_SUFFIXES else ""
                raise DataError(f"{p}: not {article} {what} file (expected {', '.join(extensions)}){hint}")
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


class _SliceDataset(Dataset):
    """Shared machinery: list of (file, slice) items, crop filter, seeded crops/augmentation."""

    def __init__(
        self,
        items: list[tuple[Path, int]],
        sizes: Optional[list[tuple[int, int]]],
        crop: Optional[Union[int, tuple[int, int]]],
        augment: bool,
        seed: int,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.crop = None if crop is None else _size(crop, "crop")
        self.augment = bool(augment)
        self.seed = seed
        self.epoch = 0
        self.stream = 0  # set by ConcatSlices: each joined dataset draws its own crops and flips
        if self.crop is not None:
            assert sizes is not None
            ch, cw = self.crop
            keep = [i for i, (h, w) in enumerate(sizes) if h >= ch and w >= cw]
            if not keep:
                largest = max(sizes, key=lambda s: s[0] * s[1])
                raise DataError(
                    f"crop size {ch}x{cw} is larger than every image "
                    f"({len(sizes)} images, e.g. {items[0][0]}; largest {largest[0]}x{largest[1]})"
                )
            if len(keep) < len(items):
                kept = set(keep)
                skipped = [str(items[i][0]) for i in range(len(items)) if i not in kept]
                warnings.warn(
                    f"{len(skipped)} of {len(items)} images are smaller than the crop "
                    f"{ch}x{cw} and are skipped (e.g. {', '.join(skipped[:3])})",
                    stacklevel=3,
                )
                items = [items[i] for i in keep]
        self.items: list[tuple[Path, int]] = items

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops/augmentations ``__getitem__`` draws."""
        self.epoch = int(epoch)

    def item_source(self, index: int) -> tuple[Path, int]:
        """``(file, slice)`` item ``index`` is read from (slice 0 for a single image)."""
        return self.items[index]

    def item_name(self, index: int) -> str:
        """A short name for item ``index``: the file stem, plus ``_sN`` for slice N of a volume."""
        path, sl = self.items[index]
        multi = sum(p == path for p, _ in self.items) > 1
        return f"{path.stem}_s{sl}" if multi else path.stem

    def generator(self, index: int) -> torch.Generator:
        """The generator used for item ``index`` in the current epoch (and :attr:`stream`)."""
        entropy = [self.seed, self.epoch, index] + ([self.stream] if self.stream else [])
        state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)

    def number_streams(self, first: int) -> int:
        """Draw from random stream ``first`` (0: the stream of a dataset on its own); the next free one."""
        self.stream = int(first)
        return self.stream + 1

    def _load(self, path: Path, slice_index: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        path, sl = self.items[index]
        x = self._load(path, sl)
        if self.crop is None and not self.augment:
            return x
        g = self.generator(index)
        if self.crop is not None:
            x = random_crop(x, self.crop, generator=g)
        if self.augment:
            x, _ = random_dihedral(x, generator=g)
        return x.contiguous()


class ImageFolderDataset(_SliceDataset):
    """Images (PNG, TIFF, BMP, JPEG) from folders and/or files.

    Args:
        paths: a folder or file, or a list of them (folders are listed sorted;
            ``recursive`` searches sub-folders).
        color: ``"gray"``, ``"y"`` (1 channel) or ``"rgb"`` (3 channels); see
            :func:`tasks.data.images.read_image`.
        crop: int or ``(h, w)`` random crop size, or None for whole images.
        augment: random dihedral flips/rotations.
        seed: non-negative int; with the epoch and index it fixes every crop.

    Items: float32 ``(C, H, W)`` in [0, 1]. Raises :class:`DataError` naming
    the path for missing/empty folders and unreadable files (headers are read
    at construction when ``crop`` is set, pixels when an item is loaded).
    """

    def __init__(
        self,
        paths: PathsArg,
        color: str = "gray",
        crop: Optional[Union[int, tuple[int, int]]] = None,
        augment: bool = False,
        seed: int = 0,
        recursive: bool = False,
    ) -> None:
        if color not in COLOR_MODES:
            raise ValueError(f"color must be one of {COLOR_MODES}, got {color!r}")
        self.color = color
        files = _collect(paths, IMAGE_EXTENSIONS, recursive, "image")
        warn_of_multipage_tiffs(files)
        sizes = [image_size(f) for f in files] if crop is not None else None
        super().__init__([(f, 0) for f in files], sizes, crop, augment, seed)

    def _load(self, path: Path, slice_index: int) -> torch.Tensor:
        return read_image(path, self.color)


class MatFolderDataset(_SliceDataset):
    """2-D real matrices from MATLAB ``.mat`` files (any version), e.g. MR magnitude images.

    Args:
        paths: a folder or ``.mat`` file, or a list of them.
        key: the variable to read; None picks the single 2-D numeric matrix.
        crop, augment, seed, recursive: as in :class:`ImageFolderDataset`.
        normalize: divide each matrix by its maximum (for data not in [0, 1]).

    Items: float32 ``(1, H, W)`` in [0, 1]. Raises :class:`DataError` naming
    the file if the matrix is not 2-D and real, holds NaN/inf, or (without
    ``normalize``) has values outside [0, 1].
    """

    def __init__(
        self,
        paths: PathsArg,
        key: Optional[str] = None,
        crop: Optional[Union[int, tuple[int, int]]] = None,
        augment: bool = False,
        seed: int = 0,
        recursive: bool = False,
        normalize: bool = False,
    ) -> None:
        self.key = key
        self.normalize = bool(normalize)
        files = _collect(paths, MAT_EXTENSIONS, recursive, "MATLAB .mat")
        sizes = None
        if crop is not None:
            sizes = []
            for f in files:
                shape = mat_array_shape(f, key)
                if len(shape) != 2:
                    raise DataError(f"{f}: expected a 2-D matrix, got shape {shape}")
                sizes.append((int(shape[0]), int(shape[1])))
        super().__init__([(f, 0) for f in files], sizes, crop, augment, seed)

    def _load(self, path: Path, slice_index: int) -> torch.Tensor:
        arr = load_mat(path, self.key)
        if arr.ndim != 2:
            raise DataError(f"{path}: expected a 2-D matrix, got shape {arr.shape}")
        if np.iscomplexobj(arr):
            raise DataError(f"{path}: matrix is complex; expected a real image")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: matrix contains NaN or infinite values")
        if self.normalize:
            m = float(np.abs(arr).max())
            if m == 0:
                raise DataError(f"{path}: matrix is all zeros (cannot normalise)")
            arr = arr / np.float32(m)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(
                f"{path}: values in [{lo:g}, {hi:g}], expected [0, 1]: scale the matrix to [0, 1] (e.g. divide by "
                f"{'255' if hi <= 255 else 'its maximum'}), or in Python read it with MatFolderDataset(..., normalize=True)"
            )
        return torch.from_numpy(np.clip(arr, 0.0, 1.0))[None]


class CTSliceDataset(_SliceDataset):
    """CT slices from ``.dcm`` (CT modality), ``.npy`` (HU) and multi-page ``.tif`` files.

    Every 2-D slice is one item (3-D ``.npy`` stacks, TIFF pages and DICOM
    frames count separately). HU data is mapped to [0, 1] with
    :func:`tasks.data.ct_slices.hu_window` and ``window=(low, high)``
    (default [-1024, 3071] HU); TIFFs are read with ``tiff_units``
    (default ``"auto"``; ``"intensity"``: raw / volume max, ``"hu+1024"`` and
    ``"display-gamma2"``: HU then window; see :mod:`tasks.data.ct_slices`).

    Items: float32 ``(1, H, W)`` in [0, 1]. ``crop``, ``augment``, ``seed``,
    ``recursive`` as in :class:`ImageFolderDataset`. Raises
    :class:`DataError` naming the file for unreadable or non-CT files
    (headers are read at construction).
    """

    def __init__(
        self,
        paths: PathsArg,
        window: tuple[float, float] = DEFAULT_HU_WINDOW,
        crop: Optional[Union[int, tuple[int, int]]] = None,
        augment: bool = False,
        seed: int = 0,
        recursive: bool = False,
        tiff_units: str = "auto",
    ) -> None:
        try:
            low, high = window
        except (TypeError, ValueError):
            raise ValueError(f"window must be a pair (low, high) of HU, got {window!r}") from None
        low, high = check_window(low, high)
        if tiff_units not in TIFF_UNITS:
            raise ValueError(f"tiff_units must be one of {TIFF_UNITS}, got {tiff_units!r}")
        self.window = (low, high)
        self.tiff_units = tiff_units
        files = _collect(paths, CT_EXTENSIONS, recursive, "CT")
        items: list[tuple[Path, int]] = []
        sizes: list[tuple[int, int]] = []
        for f in files:
            n, h, w = ct_num_slices(f)
            items.extend((f, i) for i in range(n))
            sizes.extend([(h, w)] * n)
        super().__init__(items, sizes, crop, augment, seed)

    def _load(self, path: Path, slice_index: int) -> torch.Tensor:
        return read_ct_slice(path, slice_index, window=self.window, tiff_units=self.tiff_units)


class FastMRIImageDataset(_SliceDataset):
    """Fully sampled fastMRI single-coil k-space as complex images: MRI ground truths from real k-space.

    Each slice's image is fastMRI's (:func:`tasks.data.kspace_to_image`: the
    centred orthonormal inverse FFT, at the full k-space size, not cropped),
    divided by the largest magnitude in its volume, so that the volume's
    brightest pixel has magnitude 1 and slices keep their relative
    intensities. Measuring such an image with the ``mri`` operator gives the
    file's k-space at the sampled columns, divided by that same number.

    Args:
        paths: a fastMRI ``.h5`` file or a folder of them, or a list of them.
        crop, augment, seed, recursive: as in :class:`ImageFolderDataset`.

    Items: float32 ``(2, H, W)``, the real and imaginary parts (each in
    [-1, 1], the magnitude in [0, 1]). Raises :class:`DataError` naming the
    file for files :func:`tasks.data.load_fastmri_slices` refuses (no
    ``kspace``, multi-coil, not HDF5, ...), for undersampled files (those
    that store a ``mask``), and for k-space that holds NaN/inf or only
    zeros. Every slice is read once at construction (for its volume's
    largest magnitude), and again when it is loaded.
    """

    def __init__(
        self,
        paths: PathsArg,
        crop: Optional[Union[int, tuple[int, int]]] = None,
        augment: bool = False,
        seed: int = 0,
        recursive: bool = False,
    ) -> None:
        files = _collect(paths, KSPACE_SUFFIXES, recursive, "fastMRI .h5")
        items: list[tuple[Path, int]] = []
        sizes: list[tuple[int, int]] = []
        self.scales: dict[Path, float] = {}  # each volume's largest image magnitude
        for f in files:
            slices, h, w = check_fully_sampled(f)
            peaks = [float(kspace_to_image(read_kspace_slice(f, s), crop=None).max()) for s in range(slices)]
            if not all(np.isfinite(peaks)):  # torch's max propagates NaN, Python's max of the slices would not
                raise DataError(f"{f}: k-space contains NaN or inf")
            scale = max(peaks)
            if scale <= 0:
                raise DataError(f"{f}: the k-space is all zeros")
            self.scales[f] = scale
            items.extend((f, s) for s in range(slices))
            sizes.extend([(h, w)] * slices)
        super().__init__(items, sizes, crop, augment, seed)

    def _load(self, path: Path, slice_index: int) -> torch.Tensor:
        image = kspace_to_image(read_kspace_slice(path, slice_index), crop=None, magnitude=False) / self.scales[path]
        return torch.stack((image.real, image.imag)).to(torch.float32)


class ConcatSlices(Dataset):
    """Several slice datasets as one: items of ``parts[0]``, then ``parts[1]``, ...

    Keeps the slice datasets' interface (:meth:`set_epoch`, :meth:`item_name`),
    which ``torch.utils.data.ConcatDataset`` drops. Items are whatever the parts
    return (they must agree in channels to be batched together).
    """

    def __init__(self, parts: Sequence[Dataset]) -> None:
        self.parts = list(parts)
        if not self.parts:
            raise DataError("no datasets to join")
        self.offsets = [int(n) for n in np.cumsum([0] + [len(part) for part in self.parts[:-1]])]
        self.total = self.offsets[-1] + len(self.parts[-1])
        self.number_streams(0)

    def number_streams(self, first: int) -> int:
        """Give each joined dataset its own random stream, from ``first`` on (the first part keeps that of a
        dataset on its own): item ``i`` of one part and item ``i`` of another draw independent crops and
        flips, as they would not with one seed and the same local index. Returns the next free stream."""
        for part in self.parts:
            number = getattr(part, "number_streams", None)
            first = number(first) if callable(number) else first
        return first

    def __len__(self) -> int:
        return self.total

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.total:
            raise IndexError(f"index {index} out of range for {self.total} items")
        k = bisect.bisect_right(self.offsets, index) - 1
        return k, index - self.offsets[k]

    def item_name(self, index: int) -> str:
        k, i = self._locate(index)
        return self.parts[k].item_name(i)

    def item_source(self, index: int) -> tuple[Path, int]:
        k, i = self._locate(index)
        return self.parts[k].item_source(i)

    def __getitem__(self, index: int) -> torch.Tensor:
        k, i = self._locate(index)
        return self.parts[k][i]


def _holds(path: PathLike, suffixes: tuple[str, ...]) -> bool:
    """True for a file named with one of ``suffixes``, or a folder with at least one such file in it."""
    path = Path(path)
    if path.is_file():
        return path.name.lower().endswith(suffixes)
    return path.is_dir() and bool(files_in(path, suffixes))


def holds_mat_files(path: PathLike) -> bool:
    """True for a ``.mat`` file or a folder with at least one ``.mat`` file in it."""
    return _holds(path, MAT_EXTENSIONS)


def holds_kspace_files(path: PathLike) -> bool:
    """True for a fastMRI ``.h5`` / ``.hdf5`` file or a folder with at least one such file in it."""
    return _holds(path, KSPACE_SUFFIXES)


def grayscale_dataset(
    paths: PathsArg,
    color: str = "gray",
    crop: Optional[Union[int, tuple[int, int]]] = None,
    augment: bool = False,
    seed: int = 0,
) -> Dataset:
    """One-channel images from image folders and MATLAB ``.mat`` folders mixed, e.g. natural + MR.

    Folders (or files) holding ``.mat`` files are read by :class:`MatFolderDataset`,
    the others by :class:`ImageFolderDataset` with ``color`` ("gray" or "y").
    Items: float32 ``(1, H, W)`` in [0, 1].
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    mats = [p for p in paths if holds_mat_files(p)]
    for folder in (Path(p) for p in mats if Path(p).is_dir()):
        pictures = [f.name for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)]
        if pictures:
            raise DataError(f"{folder} holds .mat files and image files ({pictures[0]}, ...): a folder is read as one "
                            "or the other; put them in separate folders and pass both")  # fmt: skip
    images = [p for p in paths if p not in mats]
    parts: list[Dataset] = []
    if mats:
        parts.append(MatFolderDataset(mats, crop=crop, augment=augment, seed=seed))
    if images:
        parts.append(ImageFolderDataset(images, color=color, crop=crop, augment=augment, seed=seed))
    if not parts:
        raise DataError("no image or .mat data paths given")
    return parts[0] if len(parts) == 1 else ConcatSlices(parts)
