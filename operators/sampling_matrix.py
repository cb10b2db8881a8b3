"""Bilinear ``grid_sample`` written out as a sparse matrix, and that matrix applied with autograd.

A projector built from ``torch.nn.functional.grid_sample`` (deepinv's Radon
transform) is linear in the image, so it is a sparse matrix: every sample of
the grid is a bilinear mix of at most four pixels. Written out once as CSR,
applying it is a sparse-dense product, several times faster on the CPU than
``grid_sample`` and its scatter-add backward, and the exact adjoint is the
transposed matrix, stored beside it. Its index arrays are int32 where they
fit: with torch's int64 default, every CPU product first copies the whole
matrix (MKL's sparse kernels take int32), which doubled its time.

Conventions are ``grid_sample(..., mode="bilinear", padding_mode="zeros",
align_corners=True)``, the ones deepinv uses: ``grid[..., 0]`` is the
column coordinate ``x``, ``grid[..., 1]`` the row coordinate ``y``, both in
``[-1, 1]`` with -1 and 1 the centres of the first and last pixels; corners
outside the image contribute zero.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def bilinear_weights(grid: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Triplets of the matrix of bilinear sampling from an ``height x width`` image.

    Args:
        grid: ``(..., 2)`` sampling positions, ``(x, y)`` in ``[-1, 1]`` (float64
            recommended: the weights inherit its precision).
        height, width: size of the sampled image.

    Returns:
        ``(sample, pixel, weight)``, 1-D and of equal length: sample ``s`` (the
        flat index into ``grid[..., 0]``) takes ``weight`` times pixel ``pixel``
        (the flat row-major index ``row * width + col``). Corners outside the
        image and zero weights are left out; repeated ``(sample, pixel)`` pairs
        do not occur.
    """
    flat = grid.reshape(-1, 2)
    col = (flat[:, 0] + 1) * (0.5 * (width - 1))
    row = (flat[:, 1] + 1) * (0.5 * (height - 1))
    col0, row0 = col.floor(), row.floor()
    fc, fr = col - col0, row - row0
    col0, row0 = col0.long(), row0.long()
    sample = torch.arange(flat.shape[0], device=grid.device)
    samples, pixels, weights = [], [], []
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        r, c = row0 + dr, col0 + dc
        keep = (r >= 0) & (r < height) & (c >= 0) & (c < width) & (weight != 0)
        samples.append(sample[keep])
        pixels.append(r[keep] * width + c[keep])
        weights.append(weight[keep])
    return torch.cat(samples), torch.cat(pixels), torch.cat(weights)


def sparse_from_triplets(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A coalesced sparse COO matrix of ``shape`` from ``(row, col, value)``; repeated pairs are summed."""
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False).coalesce()


def sum_sparse(blocks: list[Tensor]) -> Tensor:
    """The sum of coalesced COO matrices of one shape, coalesced (one sort for all of them)."""
    indices = torch.cat([b.indices() for b in blocks], dim=1)
    return sparse_from_triplets(indices[0], indices[1], torch.cat([b.values() for b in blocks]), tuple(blocks[0].shape))


class SparseMatrix:
    """A fixed real matrix ``M`` (``m x n``), kept as CSR with its transpose, applied with autograd.

    Made with :meth:`from_coo`, from a coalesced sparse COO ``(m, n)`` tensor
    on the device and in the dtype (float32 or float64) it will be applied in.

    :meth:`matmul` of ``x`` ``(n, k)`` is ``M x`` ``(m, k)``; its gradient is
    ``M^T g`` (the stored transpose), so the backward is exact and as cheap
    as the forward. :meth:`rmatmul` applies ``M^T`` the same way. :meth:`to`
    gives a copy on another device or in another dtype. Memory: twice the
    nonzeros, a value and a column index each.
    """

    def __init__(self, forward: Tensor, transpose: Tensor):
        """From ``M`` and ``M^T`` as CSR tensors (use :meth:`from_coo`)."""
        self._forward, self._transpose = forward, transpose

    @classmethod
    def from_coo(cls, matrix: Tensor) -> "SparseMatrix":
        """``M`` from a coalesced sparse COO tensor; its transpose is sorted here once."""
        with warnings.catch_warnings():  # torch says "Sparse CSR tensor support is in beta state" once per process
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            return cls(_compact_csr(matrix.to_sparse_csr()), _compact_csr(matrix.t().coalesce().to_sparse_csr()))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._forward.shape)

    @property
    def nnz(self) -> int:
        return int(self._forward._nnz())

    def __deepcopy__(self, memo: dict) -> "SparseMatrix":
        """Itself: the matrix never changes, and torch cannot deep-copy sparse CSR tensors (deepinv's
        ``physics.clone()`` deep-copies the operator)."""
        return self

    def to(self, device: torch.device, dtype: torch.dtype) -> "SparseMatrix":
        """The same matrix on ``device`` in ``dtype`` (both CSR tensors converted; no new sort)."""
        return SparseMatrix(self._forward.to(device=device, dtype=dtype), self._transpose.to(device=device, dtype=dtype))

    def matmul(self, x: Tensor) -> Tensor:
        """``M x`` for a dense ``x`` of shape ``(n, k)`` on the matrix's device and dtype, with autograd."""
        return _SparseProduct.apply(x, self._forward, self._transpose)

    def rmatmul(self, y: Tensor) -> Tensor:
        """``M^T y`` for a dense ``y`` of shape ``(m, k)``, with autograd."""
        return _SparseProduct.apply(y, self._transpose, self._forward)


def _compact_csr(matrix: Tensor) -> Tensor:
    """``matrix`` (CSR) with int32 row pointers and column indices when its sizes and nonzeros allow."""
    if max(*matrix.shape, matrix._nnz()) >= 2**31:
        return matrix
    return torch.sparse_csr_tensor(
        matrix.crow_indices().int(), matrix.col_indices().int(), matrix.values(), matrix.shape, check_invariants=False
    )


class _SparseProduct(torch.autograd.Function):
    """``matrix @ x`` whose backward is ``transpose @ grad`` (both CSR, constants)."""

    @staticmethod
    def forward(x: Tensor, matrix: Tensor, transpose: Tensor) -> Tensor:
        return matrix @ x.contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.matrix, ctx.transpose = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _SparseProduct.apply(grad, ctx.transpose, ctx.matrix), None, None
