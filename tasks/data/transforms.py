"""Image transforms on tensors ``(..., H, W)``: crops, the 8 dihedral flips/rotations, padding.

All functions work on any leading dimensions (``(H, W)``, ``(C, H, W)``,
``(B, C, H, W)``) and never touch global RNG state: random choices come
from an explicit :class:`torch.Generator`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from operators.dihedral import Dihedral

from .errors import DataError

__all__ = [
    "DIHEDRAL_INVERSE",
    "SHAPE_PRESERVING_DIHEDRAL",
    "random_crop_params",
    "random_crop",
    "center_crop",
    "dihedral",
    "dihedral_inverse",
    "random_dihedral",
    "pad_to_multiple",
    "unpad",
]

Size = Union[int, tuple[int, int]]

#: ``dihedral(dihedral(x, k), DIHEDRAL_INVERSE[k]) == x``.
DIHEDRAL_INVERSE: tuple[int, ...] = (0, 3, 2, 1, 4, 5, 6, 7)
#: The k whose transform keeps (H, W) for non-square images (identity,
#: 180-degree rotation and the two flips).
SHAPE_PRESERVING_DIHEDRAL: tuple[int, ...] = (0, 2, 4, 6)


def _check_tensor(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (..., H, W), got {tuple(x.shape)}")


def _size(size: Size, name: str = "size") -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {size!r}") from exc
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def random_crop_params(
    height: int, width: int, size: Size, generator: Optional[torch.Generator] = None
) -> tuple[int, int]:
    """Uniform random ``(top, left)`` of a ``size`` crop in a ``height x width`` image.

    Raises :class:`DataError` naming both sizes if the crop is larger than the image.
    """
    h, w = _size(size)
    if h > height or w > width:
        raise DataError(f"crop size {h}x{w} is larger than the image size {height}x{width}")
    top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
    left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
    return top, left


def random_crop(x: torch.Tensor, size: Size, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random ``size`` crop (int or ``(h, w)``) of ``x`` ``(..., H, W)`` -> ``(..., h, w)``.

    Raises :class:`DataError` naming both sizes if the crop is larger than the image.
    """
    _check_tensor(x)
    h, w = _size(size)
    top, left = random_crop_params(x.shape[-2], x.shape[-1], (h, w), generator)
    return x[..., top:top + h, left:left + w]


def center_crop(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Central ``size`` crop of ``x`` ``(..., H, W)``; top-left offset ``((H-h)//2, (W-w)//2)``.

    Raises :class:`DataError` naming both sizes if the crop is larger than the image.
    """
    _check_tensor(x)
    h, w = _size(size)
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise DataError(f"crop size {h}x{w} is larger than the image size {H}x{W}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


#: The smallest ``--size`` of a resized image: SSIM's 7x7 window must fit in it.
MIN_IMAGE_SIZE = 7


def check_size(size: int | None) -> None:
    """A :class:`DataError` unless ``size`` (``--size``) is ``None`` or at least :data:`MIN_IMAGE_SIZE`."""
    if size is not None and size < MIN_IMAGE_SIZE:
        raise DataError(f"--size must be at least {MIN_IMAGE_SIZE} (SSIM's 7x7 window), got {size}")


def check_image_measurable(name: str, height: int, width: int, block: int | None = None, scored: bool = True) -> None:
    """A :class:`DataError` naming image ``name`` (``height`` x ``width`` pixels) when the benchmark protocol
    cannot measure it (smaller than one ``block`` x ``block`` CS block: the zero padding would be most of
    what is measured) or, when it is to be ``scored``, cannot score it (smaller than SSIM's 7x7 window)."""
    if block and (height < block or width < block):
        raise DataError(
            f"{name}: the image is {height}x{width} pixels, smaller than one {block}x{block} block of the cs "
            f"operator; use images of at least {block}x{block} pixels"
        )
    if scored and min(height, width) < MIN_IMAGE_SIZE:
        raise DataError(
            f"{name}: the image is {height}x{width} pixels, too small to score (SSIM's 7x7 window); use images of "
            f"at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels"
        )


def resize_square(x: torch.Tensor, size: int, name: str = "the image", complex_pairs: bool = False) -> torch.Tensor:
    """``x`` ``(C, H, W)`` with ``H == W`` resized to ``(C, size, size)`` (bilinear, anti-aliased).

    An image in [0, 1] is clamped to [0, 1] after the interpolation (which can overshoot at edges). With
    ``complex_pairs`` (the mri task's complex images: channels 0 and 1 are the real and imaginary parts, in
    [-1, 1], magnitude at most 1), the signs are kept and only a magnitude above 1 is scaled back to 1.
    Returns ``x`` itself when it already has that size. Raises :class:`DataError` naming ``name`` for a non-square image.
    """
    _check_tensor(x)
    height, width = x.shape[-2:]
    if height != width:
        raise DataError(f"--size resizes square images only; {name} is {height}x{width}")
    if height == size:
        return x
    resized = torch.nn.functional.interpolate(x[None].double(), size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False)  # fmt: skip
    if not complex_pairs:
        return resized[0].clamp(0, 1).to(x.dtype)
    out = resized[0]
    magnitude = torch.linalg.vector_norm(out[:2], dim=0)
    out[:2] = out[:2] / magnitude.clamp_min(1.0)
    return out.to(x.dtype)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 7:
        raise ValueError(f"k must be an int in 0..7, got {k!r}")
    return k


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element ``k`` (0..7) of the dihedral group D4 acting on ``x`` ``(..., H, W)``.

    ``k % 4`` counter-clockwise 90-degree rotations (``torch.rot90`` on the
    last two axes), followed for ``k >= 4`` by a left-right flip
    (:meth:`operators.dihedral.Dihedral.from_index`). ``k = 0`` is the
    identity. Odd ``k % 4`` swap H and W. Inverse: :func:`dihedral_inverse`.
    """
    _check_tensor(x)
    return Dihedral.from_index(_check_k(k)).apply(x)


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo :func:`dihedral`: ``dihedral_inverse(dihedral(x, k), k) == x``."""
    _check_tensor(x)
    return Dihedral.from_index(_check_k(k)).invert(x)


def random_dihedral(
    x: torch.Tensor, generator: Optional[torch.Generator] = None, shape_preserving: bool = False
) -> tuple[torch.Tensor, int]:
    """Apply a uniformly random dihedral transform; returns ``(transformed, k)``.

    With ``shape_preserving=True`` (or automatically when H != W) k is drawn
    from :data:`SHAPE_PRESERVING_DIHEDRAL`, so the output keeps shape (H, W).
    """
    _check_tensor(x)
    choices = (
        SHAPE_PRESERVING_DIHEDRAL
        if shape_preserving or x.shape[-2] != x.shape[-1]
        else tuple(range(8))
    )
    k = choices[int(torch.randint(0, len(choices), (1,), generator=generator).item())]
    return dihedral(x, k), k


def pad_to_multiple(x: torch.Tensor, multiple: Size) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``x`` ``(..., H, W)`` at the bottom/right to multiples of ``multiple``.

    Returns ``(padded, (pad_h, pad_w))``; :func:`unpad` with that padding
    crops the original back. ``multiple`` is an int or ``(mh, mw)``.
    """
    _check_tensor(x)
    mh, mw = _size(multiple, "multiple")
    H, W = x.shape[-2:]
    pad_h, pad_w = (-H) % mh, (-W) % mw
    if pad_h == 0 and pad_w == 0:
        return x, (0, 0)
    return F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=0), (pad_h, pad_w)


def unpad(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """Remove bottom/right ``padding = (pad_h, pad_w)`` added by :func:`pad_to_multiple`."""
    _check_tensor(x)
    pad_h, pad_w = int(padding[0]), int(padding[1])
    H, W = x.shape[-2:]
    if pad_h < 0 or pad_w < 0 or pad_h >= H or pad_w >= W:
        raise ValueError(f"padding {padding} does not fit x of shape {tuple(x.shape)}")
    return x[..., : H - pad_h, : W - pad_w]
