"""Block compressed sensing with an orthonormal Gaussian sampling matrix (``"cs"``).

The image is cut into groups of ``n = block**2`` pixels and every group is
multiplied by the same ``q x n`` matrix ``Phi``, ``q = ceil(ratio * n)``
(103 / 308 / 512 at 10 / 30 / 50 % with ``block=32``).  ``Phi`` is the first
``q`` columns (transposed) of the orthogonal ``Q`` of a QR factorisation of a
seeded ``n x n`` Gaussian matrix, so its rows are orthonormal.

Two ways of forming the groups:

* ``mode="spatial"`` -- non-overlapping ``block x block`` pixel blocks, as in
  DDNM (unfold); blocks are read in raster order, pixels row-major within a
  block.
* ``mode="permuted"`` -- structurally random sampling as in the IDM authors'
  code: the ``H*W`` pixels of each channel are reordered by a seeded random
  permutation (the same for every channel) and cut into consecutive groups of
  ``n``.  ``resample(seed)`` draws a new permutation and keeps ``Phi``.

Images whose size is not a multiple of the block are handled *without*
breaking the orthonormality of the rows: a group with only ``r < n`` real
pixels (an edge block in spatial mode, the last group in permuted mode) is
measured by its own ``ceil(ratio * r) x r`` orthonormal-row matrix, zero-padded
to ``q x n``.  The measurement entries of those zero rows are always 0.  Hence
``A`` is a partial isometry (``A A^T`` is a diagonal 0/1 projection, equal to
the identity when ``H`` and ``W`` -- or ``H*W`` in permuted mode -- are
multiples of the block), ``A^T A`` is an orthogonal projection and
``A_dagger = A_adjoint`` is the *exact* pseudo-inverse for every image size.
(Zero-padding the image and using the full ``Phi`` on the padded blocks would
not give that: ``A A^T`` would no longer be a projection.)  The effective
sampling ratio stays ``ratio`` (up to the per-group rounding up).

No dense ``(C*n_blocks*q) x (C*H*W)`` matrix is ever built: ``A`` is a gather
(permuted mode) or a reshape (spatial mode) followed by one batched matmul
with ``Phi`` per group type.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from . import register
from .base import Operator, OperatorInputError, check_positive_int, check_ratio, check_seed, kept_between_calls

_MODES = ("spatial", "permuted")


def _orthonormal_basis(gaussian: torch.Tensor) -> torch.Tensor:
    """``m x m`` orthogonal matrix (QR of a square ``m x m`` Gaussian, float64): ``Phi`` is its first columns, transposed."""
    q, _ = torch.linalg.qr(gaussian)
    return q


def _num_rows(ratio: float, size: int) -> int:
    """``ceil(ratio * size)``, robust to ``ratio * size`` landing a hair above an integer."""
    return max(1, math.ceil(ratio * size - 1e-9))


@register("cs")
class CompressedSensing(Operator):
    """Block Gaussian compressed sensing ``y = Phi_blocks(P x)`` (see the module docstring).

    Args:
        img_size: ``(H, W)``, any positive size.
        channels: ``C``; every channel is sampled separately with the same ``Phi``
            (and, in permuted mode, the same permutation).
        ratio: sampling ratio in ``(0, 1]``; ``q = ceil(ratio * block**2)``.
        block: block side ``b`` (groups of ``n = b*b`` pixels).
        mode: ``"permuted"`` (IDM, structurally random) or ``"spatial"`` (DDNM).
        seed: seed of the pixel permutation (permuted mode only; ``resample``
            changes it).
        phi_seed: seed of the Gaussian matrix ``Phi`` is drawn from (fixed across
            ``resample``, as the trained network expects one ``Phi``).

    Shapes: ``x`` is ``(B, C, H, W)`` real (any range, typically [0, 1] or
    [-1, 1]); ``y = A(x)`` is ``(B, C, n_blocks, q)`` with ``n_blocks =
    ceil(H/b) * ceil(W/b)`` (spatial) or ``ceil(H*W / b**2)`` (permuted).
    ``A_adjoint(y)`` and ``A_dagger(y)`` are ``(B, C, H, W)`` and identical
    (exact pseudo-inverse).  Works in float32 and float64 on any device (the
    float64 CPU matrices are cast to the input's device and dtype).
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        channels: int = 1,
        ratio: float = 0.1,
        block: int = 32,
        mode: str = "permuted",
        seed: int = 0,
        phi_seed: int = 0,
        *,
        _bases: dict[int, torch.Tensor] | None = None,
    ):
        super().__init__(img_size, channels)
        self.ratio = check_ratio(ratio, "ratio")
        block = check_positive_int(block, "block")
        if mode not in _MODES:
            raise OperatorInputError(f"mode must be one of {_MODES}, got {mode!r}")
        seed, phi_seed = check_seed(seed), check_seed(phi_seed, "phi_seed")
        self.block = block
        self.mode = mode
        self.seed = seed
        self.phi_seed = phi_seed
        n = block * block
        self.q = _num_rows(self.ratio, n)
        h, w = self.img_hw

        # Sizes (number of real pixels) of the groups that occur.
        if mode == "spatial":
            hr, wr = h % block, w % block
            # (block-row slice, real rows per block) and the same for columns: full ones, then the partial one
            self._rows = ([(slice(0, h // block), block)] if h >= block else []) + (
                [(slice(h // block, None), hr)] if hr else []
            )
            self._cols = ([(slice(0, w // block), block)] if w >= block else []) + (
                [(slice(w // block, None), wr)] if wr else []
            )
            sizes = {rh * cw for _, rh in self._rows for _, cw in self._cols}
            self.n_blocks = math.ceil(h / block) * math.ceil(w / block)
        else:
            total = h * w
            self._n_full, self._rest = divmod(total, n)
            sizes = {n} if self._n_full else set()
            if self._rest:
                sizes.add(self._rest)
            self.n_blocks = self._n_full + (1 if self._rest else 0)

        # Orthonormal-row matrices, float64 on the CPU, keyed by group size: the first
        # rows of one orthogonal basis per size, so operators that differ only in ratio
        # or permutation share the bases (``resample``, ``variant``) instead of a QR each.
        self._bases = {} if _bases is None else _bases
        missing = sorted(size for size in sizes if size not in self._bases)
        if missing:
            gaussian = torch.randn(n, n, generator=torch.Generator().manual_seed(phi_seed), dtype=torch.float64)
            for size in missing:
                self._bases[size] = _orthonormal_basis(gaussian[:size, :size])
        self._matrices = {
            size: self._bases[size][:, : _num_rows(self.ratio, size)].T.contiguous() for size in sorted(sizes)
        }
        # Per (rows, cols) part, the q x n matrix acting on a padded block.
        self._phi = self._matrices[n] if n in self._matrices else None
        if mode == "spatial":
            self._parts = []
            for rs, rh in self._rows:
                for cs, cw in self._cols:
                    self._parts.append((rs, cs, self._embed_spatial(rh, cw)))
        else:
            self._last = self._embed_first(self._rest) if self._rest else None
            perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
            self._perm = perm
            self._inv_perm = torch.empty_like(perm)
            self._inv_perm[perm] = torch.arange(h * w)
        self._cast_cache: dict[tuple, dict[str, Any]] = {}

    # ---- matrices ------------------------------------------------------------
    def _embed_spatial(self, rh: int, cw: int) -> torch.Tensor:
        """``q x n`` matrix for a ``rh x cw`` (top-left) block of real pixels, zero elsewhere."""
        b, n = self.block, self.block * self.block
        if rh * cw == n:
            return self._matrices[n]
        small = self._matrices[rh * cw]
        out = torch.zeros(self.q, n, dtype=torch.float64)
        idx = (torch.arange(rh)[:, None] * b + torch.arange(cw)[None, :]).reshape(-1)
        out[: small.shape[0], idx] = small
        return out

    def _embed_first(self, r: int) -> torch.Tensor:
        """``q x n`` matrix acting on the first ``r`` entries of a group, zero elsewhere."""
        small = self._matrices[r]
        out = torch.zeros(self.q, self.block * self.block, dtype=torch.float64)
        out[: small.shape[0], :r] = small
        return out

    def _cast(self, like: torch.Tensor) -> dict[str, Any]:
        """The matrices / permutation on ``like``'s device and dtype (cached for the latest device and dtype;
        made outside inference mode, :func:`~operators.base.kept_between_calls`)."""
        key = (like.device, like.dtype)
        cached = self._cast_cache.get(key)
        if cached is None:
            dt = dict(device=like.device, dtype=like.dtype)
            with kept_between_calls():
                if self.mode == "spatial":
                    cached = {"parts": [(rs, cs, m.to(**dt)) for rs, cs, m in self._parts]}
                else:
                    cached = {
                        "phi": None if self._phi is None else self._phi.to(**dt),
                        "last": None if self._last is None else self._last.to(**dt),
                        "perm": self._perm.to(like.device),
                        "inv_perm": self._inv_perm.to(like.device),
                    }
            self._cast_cache = {key: cached}  # keep only the latest (device, dtype)
        return cached

    # ---- operator ------------------------------------------------------------
    def measurement_shape(self) -> tuple[int, int, int]:
        """``(C, n_blocks, q)``."""
        return (self.channels, self.n_blocks, self.q)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, n_blocks, q)``."""
        self.check_image(x)
        mats = self._cast(x)
        bsz, c, h, w = x.shape
        b, n = self.block, self.block * self.block
        if self.mode == "spatial":
            hb, wb = math.ceil(h / b), math.ceil(w / b)
            xp = F.pad(x, (0, wb * b - w, 0, hb * b - h))
            blocks = xp.reshape(bsz, c, hb, b, wb, b).permute(0, 1, 2, 4, 3, 5).reshape(bsz, c, hb, wb, n)
            y = x.new_empty(bsz, c, hb, wb, self.q)
            for rs, cs, m in mats["parts"]:
                y[:, :, rs, cs] = blocks[:, :, rs, cs] @ m.T
            return y.reshape(bsz, c, hb * wb, self.q)
        v = x.reshape(bsz, c, h * w).index_select(-1, mats["perm"])  # faster than [..., perm] on the CPU
        out = []
        if self._n_full:
            out.append(v[..., : self._n_full * n].reshape(bsz, c, self._n_full, n) @ mats["phi"].T)
        if self._rest:
            last = F.pad(v[..., self._n_full * n :], (0, n - self._rest))
            out.append((last @ mats["last"].T).unsqueeze(2))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact transpose ``A^T``: ``(B, C, n_blocks, q)`` -> ``(B, C, H, W)``."""
        self.check_measurement(y)
        mats = self._cast(y)
        bsz, c = y.shape[:2]
        h, w = self.img_hw
        b, n = self.block, self.block * self.block
        if self.mode == "spatial":
            hb, wb = math.ceil(h / b), math.ceil(w / b)
            yb = y.reshape(bsz, c, hb, wb, self.q)
            blocks = y.new_empty(bsz, c, hb, wb, n)
            for rs, cs, m in mats["parts"]:
                blocks[:, :, rs, cs] = yb[:, :, rs, cs] @ m
            xp = blocks.reshape(bsz, c, hb, wb, b, b).permute(0, 1, 2, 4, 3, 5).reshape(bsz, c, hb * b, wb * b)
            return xp[:, :, :h, :w]
        parts = []
        if self._n_full:
            parts.append((y[:, :, : self._n_full] @ mats["phi"]).reshape(bsz, c, self._n_full * n))
        if self._rest:
            parts.append((y[:, :, -1] @ mats["last"])[..., : self._rest])
        v = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return v.index_select(-1, mats["inv_perm"]).reshape(bsz, c, h, w)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact pseudo-inverse, equal to :meth:`A_adjoint` (the rows of ``A`` are orthonormal)."""
        return self.A_adjoint(y)

    # ---- state -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg = {
            "name": self.name,
            "img_size": list(self.img_hw),
            "channels": self.channels,
            "ratio": self.ratio,
            "block": self.block,
            "mode": self.mode,
            "phi_seed": self.phi_seed,
        }
        if self.mode == "permuted":
            cfg["seed"] = self.seed
        return cfg

    def resample(self, seed: int) -> "CompressedSensing":
        """A new permutation from ``seed`` (permuted mode; ``Phi`` is reused, not recomputed).

        Spatial mode has no per-draw randomness and returns ``self``.
        """
        if self.mode != "permuted":
            return self
        return self.variant({**self.config(), "seed": int(seed)})

    def variant(self, config: dict[str, Any]) -> "CompressedSensing":
        """The operator of ``config`` (any ratio, seed, size), sharing this one's bases when ``Phi`` is the same."""
        kwargs = {k: v for k, v in config.items() if k != "name"}
        same_phi = kwargs.get("block") == self.block and kwargs.get("phi_seed") == self.phi_seed
        return type(self)(**kwargs, _bases=self._bases if same_phi else None)
