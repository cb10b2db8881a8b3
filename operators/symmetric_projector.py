"""A parallel-beam projector stored as a few representative views and the square's symmetries.

A quarter turn or a mirror of a square image about its centre maps a
parallel-beam view at angle ``theta`` onto the view at ``theta + 90``,
``-theta`` or ``90 - theta`` degrees (the detector read forwards or
backwards). So when the angle set is closed under those maps, as the uniform
``k * 180 / views`` sets mostly are, every view is a representative view of
a transformed image::

    R_v x = flip?(R_s (g x))      g: one of the 8 symmetries of the square

and the whole projector is a sparse matrix of the representative views
only (16 of 60 views, 5 of 18), applied to a few transformed copies of the
image in one sparse-dense product. On the CPU that product is
memory-bound, and reading a quarter of the matrix for four columns at once
is about 4x faster than reading all of it for one; the matrix also takes a
quarter of the memory.

Which view is which transformed representative is not derived from the
geometry but found numerically, at construction: each view's sinogram of a
random float64 image is compared with the representatives' sinograms of its
8 transforms, read forwards and backwards (relative tolerance ``1e-9``;
rounding of the sampling grids' sines and cosines differs by about
``1e-15``). A view that matches none becomes a representative itself, so
any angle set is handled, symmetric or not.

The transforms act on a *domain*: the smallest square of the projector's
pixel grid that is centred on the rotation centre and holds the image. The
grid's centre is the image's when the padded grid and the image have sides
of the same parity; else the domain is one pixel larger than the image and
the image sits in one corner of it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from .sampling_matrix import SparseMatrix, sparse_from_triplets, sum_sparse

#: The symmetries of the square as ``(quarter turns, mirrored first)``; the identity first.
SQUARE_SYMMETRIES: tuple[tuple[int, bool], ...] = tuple((turns, mirror) for mirror in (False, True) for turns in range(4))

_MATCH_TOLERANCE = 1e-9


def transform(images: Tensor, symmetry: tuple[int, bool]) -> Tensor:
    """``(N, S, S)`` images, mirrored left-right (when ``symmetry[1]``) and then turned ``symmetry[0]`` quarters."""
    turns, mirror = symmetry
    return torch.rot90(images.flip(-1) if mirror else images, turns, dims=(-2, -1))


def inverse_transform(images: Tensor, symmetry: tuple[int, bool]) -> Tensor:
    """The inverse of :func:`transform` (which permutes pixels, so this is also its adjoint)."""
    turns, mirror = symmetry
    turned = torch.rot90(images, -turns, dims=(-2, -1))
    return turned.flip(-1) if mirror else turned


class SymmetricProjector:
    """``R``, a projector of ``W x W`` images onto ``(D, views)`` sinograms, by representative views.

    Built by :meth:`from_views`; see the module docstring. :meth:`project`
    and :meth:`back_project` (the exact adjoint) are differentiable; :meth:`to`
    converts to a device and dtype. Attributes: ``representatives`` (the
    view indices kept in the matrix) and ``symmetries`` (the transforms
    applied to every image, the identity first).
    """

    def __init__(self, matrix: SparseMatrix, symmetries: tuple[tuple[int, bool], ...], gather: Tensor,
                 representatives: tuple[int, ...], image_size: int, domain_size: int, offset: int,
                 detectors: int, views: int):
        """Use :meth:`from_views`. ``gather`` ``(detectors * views,)`` picks sinogram row
        ``d * views + v`` from the product's rows ``(d' * n_rep + r) * len(symmetries) + j``."""
        self.matrix, self.symmetries, self.gather = matrix, symmetries, gather
        self.representatives = representatives
        self.image_size, self.domain_size, self.offset = image_size, domain_size, offset
        self.detectors, self.views = detectors, views

    @classmethod
    def from_views(cls, view_matrix: Callable[[int], Tensor], views: int, detectors: int,
                   image_size: int, domain_size: int, offset: int) -> "SymmetricProjector":
        """Find the representative views and build the projector (float64, CPU).

        Args:
            view_matrix: ``v -> `` view ``v``'s coalesced float64 COO matrix
                ``(detectors, domain_size ** 2)`` (row: detector cell; column:
                domain pixel, row-major). Called once per view.
            views, detectors: sinogram size.
            image_size: ``W``; the image is pixels ``[offset, offset + W)`` of the domain, on both axes.
            domain_size: ``S`` (``W`` or ``W + 1``), a square about the rotation centre.
        """
        probe = torch.rand(1, domain_size, domain_size, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(0))
        transformed = [transform(probe, s).reshape(-1) for s in SQUARE_SYMMETRIES]
        kept, kept_sinograms, assignment = [], [], []
        for v in range(views):
            block = view_matrix(v)
            match = _find_match(block @ probe.reshape(-1), kept_sinograms)
            if match is None:
                kept.append((v, block))
                kept_sinograms.append([block @ image for image in transformed])
                match = (len(kept) - 1, SQUARE_SYMMETRIES[0], False)
            assignment.append(match)

        used = sorted({symmetry for _, symmetry, _ in assignment}, key=SQUARE_SYMMETRIES.index)  # identity first
        slot = {symmetry: j for j, symmetry in enumerate(used)}
        n_rep = len(kept)
        stacked = []
        for r, (_, block) in enumerate(kept):
            rows, columns = block.indices()
            stacked.append(sparse_from_triplets(rows * n_rep + r, columns, block.values(),
                                                (detectors * n_rep, domain_size ** 2)))
        gather = torch.empty(detectors * views, dtype=torch.long)
        cells = torch.arange(detectors)
        for v, (r, symmetry, backwards) in enumerate(assignment):
            source = (detectors - 1 - cells) if backwards else cells
            gather[cells * views + v] = (source * n_rep + r) * len(used) + slot[symmetry]
        return cls(SparseMatrix.from_coo(sum_sparse(stacked)), tuple(used), gather,
                   tuple(v for v, _ in kept), image_size, domain_size, offset, detectors, views)

    def to(self, device: torch.device, dtype: torch.dtype) -> "SymmetricProjector":
        """The same projector on ``device`` in ``dtype`` (float32 or float64)."""
        return SymmetricProjector(self.matrix.to(device, dtype), self.symmetries, self.gather.to(device),
                                  self.representatives, self.image_size, self.domain_size, self.offset,
                                  self.detectors, self.views)

    @property
    def nnz(self) -> int:
        """Nonzeros of the stored matrix (the representative views)."""
        return self.matrix.nnz

    def project(self, images: Tensor) -> Tensor:
        """``R x``: ``(N, W, W)`` -> ``(N, D, views)``, on the projector's device and dtype."""
        n, size = images.shape[0], self.domain_size
        after = size - self.image_size - self.offset
        domain = F.pad(images, (self.offset, after, self.offset, after))
        copies = torch.stack([transform(domain, s) for s in self.symmetries])  # (k, N, S, S)
        product = self.matrix.matmul(copies.reshape(-1, size * size).t())  # (D * n_rep, k * N)
        rows = product.reshape(-1, n).index_select(0, self.gather)  # (D * views, N)
        return rows.t().reshape(n, self.detectors, self.views)

    def back_project(self, sinograms: Tensor) -> Tensor:
        """``R^T y`` (the exact adjoint of :meth:`project`): ``(N, D, views)`` -> ``(N, W, W)``."""
        n, k, size = sinograms.shape[0], len(self.symmetries), self.domain_size
        rows = sinograms.reshape(n, -1).t()  # (D * views, N)
        scattered = rows.new_zeros(self.matrix.shape[0] * k, n).index_copy(0, self.gather, rows)
        product = self.matrix.rmatmul(scattered.reshape(-1, k * n))  # (S * S, k * N)
        copies = product.t().reshape(k, n, size, size)
        domain = sum(inverse_transform(copies[j], s) for j, s in enumerate(self.symmetries))
        end = self.offset + self.image_size
        return domain[:, self.offset:end, self.offset:end]


def _find_match(target: Tensor, kept_sinograms: list[list[Tensor]]) -> tuple[int, tuple[int, bool], bool] | None:
    """``(representative, symmetry, read backwards)`` whose sinogram of the transformed probe is ``target``, if any."""
    tolerance = _MATCH_TOLERANCE * float(target.abs().max())
    for r, sinograms in enumerate(kept_sinograms):
        for symmetry, sinogram in zip(SQUARE_SYMMETRIES, sinograms):
            for backwards in (False, True):
                candidate = sinogram.flip(0) if backwards else sinogram
                if float((candidate - target).abs().max()) <= tolerance:
                    return r, symmetry, backwards
    return None
