"""Inpainting: keep a subset of the pixels, zero the others (``"inpainting"``).

``A(x) = mask * x`` with a binary ``(H, W)`` mask of *kept* pixels, shared by
all channels, as deepinv's ``Inpainting``.  ``A`` is an orthogonal projection,
so ``A_adjoint = A_dagger = A`` exactly.

Masks:

* ``mask="random"`` -- exactly ``round(ratio * H * W)`` kept pixels chosen by a
  seeded permutation (``ratio`` = fraction of kept pixels; ``resample(seed)``
  draws a new mask);
* ``mask="box"`` -- one missing rectangle of ``round(box_fraction * H) x
  round(box_fraction * W)`` pixels, centred (``box_position="center"``) or at a
  seeded uniform position (``box_position="random"``);
* a user mask: a 2-D array / tensor of shape ``(H, W)`` or the path of an image
  file (read with Pillow, converted to grey); nonzero = kept.

``config()`` stores a user mask compactly (base64 of ``np.packbits`` with its
shape), never the file path, so the config survives the file.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import numpy as np
import torch

from . import register
from .base import Operator, OperatorInputError, check_ratio, check_seed

_POSITIONS = ("center", "random")


def _pack(mask: np.ndarray) -> dict[str, Any]:
    """Compact JSON-able form of a boolean 2-D mask."""
    return {"shape": list(mask.shape), "packbits": base64.b64encode(np.packbits(mask.reshape(-1))).decode("ascii")}


def _unpack(packed: dict[str, Any]) -> np.ndarray:
    """The boolean mask of :func:`_pack`'s dict; damaged data (not base64, or not as many bytes as the shape
    needs) is an error, not a mask padded with zeros or read from uninitialised memory."""
    try:
        shape = tuple(int(s) for s in packed["shape"])
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be two positive sizes, got {packed['shape']!r}")
        bits = np.frombuffer(base64.b64decode(packed["packbits"], validate=True), dtype=np.uint8)
        pixels = shape[0] * shape[1]
        if bits.size != (pixels + 7) // 8:
            raise ValueError(f"{bits.size} bytes of packed bits for a {shape[0]}x{shape[1]} mask, which needs {(pixels + 7) // 8}")
        return np.unpackbits(bits, count=pixels).astype(bool).reshape(shape)
    except (KeyError, TypeError, ValueError) as err:  # binascii.Error is a ValueError
        raise OperatorInputError(f"mask dict must have 'shape' and base64 'packbits' entries: {err}") from None


def read_mask_file(path: str | os.PathLike) -> np.ndarray:
    """The kept pixels of a mask image file, ``(H, W)`` bool (non-zero = kept), upright by its EXIF orientation
    as images are read; a clear error if unreadable, or if it holds more than two grey levels (a lossy JPEG's
    ringing would count pixels of a hole as kept, and give the truth away)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:  # from a file object: Pillow memory-maps a file opened by name, and then mis-turns uncompressed TIFF pages
        with open(path, "rb") as handle, Image.open(handle) as img:
            levels = np.asarray(ImageOps.exif_transpose(img).convert("L"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise OperatorInputError(
            f"cannot read mask file {os.fspath(path)!r} ({err}); mask must be 'random', 'box', "
            "a 2-D array/tensor or a readable image file"
        ) from None
    count = len(np.unique(levels))
    if count > 2:
        raise OperatorInputError(
            f"mask file {os.fspath(path)!r} holds {count} grey levels; a mask holds two, 0 for the missing pixels and "
            "one other for the kept ones (save it losslessly, e.g. as PNG: JPEG compression adds levels)"
        )
    return levels != 0


def is_packed_mask(value: Any) -> bool:
    """Whether ``value`` is the ``{"shape", "packbits"}`` form in which ``config()`` records a user mask."""
    return isinstance(value, dict) and set(value) == {"shape", "packbits"}


def same_mask(recorded: dict[str, Any], given: Any) -> bool:
    """Whether the user mask ``given`` (a file path or an array) keeps the pixels of the recorded packed mask
    ``recorded``: a model trained with ``--mask FILE`` serves that file's mask, wherever it lies."""
    if isinstance(given, str) and given in ("random", "box"):
        return False
    try:
        if isinstance(given, (str, os.PathLike)):
            keep = read_mask_file(given)
        else:
            keep = np.asarray(given.detach().cpu() if torch.is_tensor(given) else given) != 0
        return bool(np.array_equal(_unpack(recorded), keep))
    except (OperatorInputError, TypeError, ValueError):
        return False


@register("inpainting")
class Inpainting(Operator):
    """Pixel-mask inpainting ``y = mask * x`` (see the module docstring).

    Args:
        img_size: ``(H, W)``.
        channels: ``C`` (the mask is shared by all channels).
        mask: ``"random"``, ``"box"``, a 2-D ``(H, W)`` array / tensor (nonzero =
            kept), a path to a mask image, or the ``{"shape", "packbits"}`` dict
            that :meth:`config` stores.
        ratio: fraction of kept pixels for ``mask="random"``, in ``(0, 1]``.
        box_fraction: side of the missing box as a fraction of ``H`` and ``W``
            for ``mask="box"``, in ``(0, 1)``.
        box_position: ``"center"`` or ``"random"`` (seeded) for ``mask="box"``.
        seed: seed of the random mask / box position.

    Shapes: ``x`` is ``(B, C, H, W)`` (any range); ``y`` is ``(B, C, H, W)`` with
    zeros at the missing pixels.  ``A_adjoint(y) = A_dagger(y) = mask * y``
    (exact).  The float64 CPU mask is cast to the input's device and dtype.
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        channels: int = 1,
        mask: Any = "random",
        ratio: float = 0.5,
        box_fraction: float = 0.5,
        box_position: str = "center",
        seed: int = 0,
    ):
        super().__init__(img_size, channels)
        h, w = self.img_hw
        self.seed = check_seed(seed)
        self.kind = "user"
        self.ratio = self.box_fraction = self.box_position = None
        if isinstance(mask, str) and mask == "random":
            self.kind = "random"
            self.ratio = check_ratio(ratio, "ratio")
            kept = int(round(self.ratio * h * w))
            if kept == 0:
                raise OperatorInputError(f"ratio={ratio!r} keeps no pixel of a {h}x{w} image")
            idx = torch.randperm(h * w, generator=torch.Generator().manual_seed(self.seed))[:kept].numpy()
            keep = np.zeros(h * w, dtype=bool)
            keep[idx] = True
            keep = keep.reshape(h, w)
        elif isinstance(mask, str) and mask == "box":
            self.kind = "box"
            self.box_fraction = check_ratio(box_fraction, "box_fraction")
            if box_position not in _POSITIONS:
                raise OperatorInputError(f"box_position must be one of {_POSITIONS}, got {box_position!r}")
            self.box_position = box_position
            bh, bw = int(round(self.box_fraction * h)), int(round(self.box_fraction * w))
            if bh * bw >= h * w:
                raise OperatorInputError(
                    f"box_fraction={box_fraction!r} removes every pixel of a {h}x{w} image; use a value below 1"
                )
            if bh == 0 or bw == 0:
                raise OperatorInputError(
                    f"box_fraction={box_fraction!r} gives a {bh}x{bw} box on a {h}x{w} image: it removes no pixel"
                )
            if box_position == "center":
                top, left = (h - bh) // 2, (w - bw) // 2
            else:
                rng = np.random.RandomState(self.seed)
                top, left = int(rng.randint(0, h - bh + 1)), int(rng.randint(0, w - bw + 1))
            keep = np.ones((h, w), dtype=bool)
            keep[top : top + bh, left : left + bw] = False
        elif isinstance(mask, (str, os.PathLike)):
            keep = read_mask_file(mask)
            self._check_user_mask(keep, f"mask file {os.fspath(mask)!r}")
        elif isinstance(mask, dict):
            keep = _unpack(mask)
            self._check_user_mask(keep, "mask")
        elif isinstance(mask, (np.ndarray, torch.Tensor)):
            arr = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
            if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
                raise OperatorInputError(f"mask array must be numeric or boolean, got dtype {arr.dtype}")
            if arr.ndim > 2 and all(s == 1 for s in arr.shape[:-2]):
                arr = arr.reshape(arr.shape[-2:])
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise OperatorInputError("mask contains NaN or inf values")
            keep = arr != 0
            self._check_user_mask(keep, "mask")
        else:
            raise OperatorInputError(
                f"mask must be 'random', 'box', a 2-D array/tensor, a file path or a packed dict, got {mask!r:.100}"
            )
        self._keep = keep
        self._mask = torch.from_numpy(keep.astype(np.float64))

    def _check_user_mask(self, keep: np.ndarray, what: str) -> None:
        if keep.ndim != 2 or tuple(keep.shape) != self.img_hw:
            raise OperatorInputError(
                f"{what} must have shape (H, W) = {self.img_hw} to match img_size, got {tuple(keep.shape)}"
            )
        if not keep.any():
            raise OperatorInputError(f"{what} keeps no pixel (all zeros)")

    @property
    def mask(self) -> torch.Tensor:
        """The ``(H, W)`` float64 CPU 0/1 mask of kept pixels (a copy: the operator's own does not change)."""
        return self._mask.clone()

    def measurement_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return self.image_shape

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``, zeros at the missing pixels."""
        self.check_image(x)
        return x * self.cast_like(self._mask, x)

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """``mask * y`` (exact adjoint: ``A`` is symmetric)."""
        self.check_measurement(y)
        return y * self.cast_like(self._mask, y)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """``mask * y``, the exact pseudo-inverse (``A`` is an orthogonal projection)."""
        return self.A_adjoint(y)

    @classmethod
    def ignored_settings(cls, settings: dict[str, Any]) -> dict[str, str]:
        """``ratio`` beside a box or user mask, ``box_fraction`` / ``box_position`` beside a random or user mask."""
        mask = settings.get("mask", "random")
        kind = mask if isinstance(mask, str) and mask in ("random", "box") else "user"
        uses = {"random": ("ratio",), "box": ("box_fraction", "box_position"), "user": ()}[kind]
        purpose = {"ratio": "the kept fraction of random masks", "box_fraction": "the side of box masks",
                   "box_position": "where box masks go"}  # fmt: skip
        shown = f"mask={mask!r}" if kind != "user" else "a mask of given pixels"
        return {key: f"{key} sets {why}; {shown} does not use it" for key, why in purpose.items()
                if key in settings and key not in uses}  # fmt: skip

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"name": self.name, "img_size": list(self.img_hw), "channels": self.channels}
        if self.kind == "random":
            cfg.update(mask="random", ratio=self.ratio, seed=self.seed)
        elif self.kind == "box":
            cfg.update(mask="box", box_fraction=self.box_fraction, box_position=self.box_position)
            if self.box_position == "random":
                cfg["seed"] = self.seed
        else:
            cfg["mask"] = _pack(self._keep)
        return cfg
