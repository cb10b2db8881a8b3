"""Shared fixtures: a tiny exact-pseudo-inverse operator, float64 helpers and a folder of one picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deepinv.physics import LinearPhysics
from PIL import Image


class OrthoRowsOperator(LinearPhysics):
    """``A = Phi`` with ``m`` orthonormal rows on flattened ``(C, H, W)`` images, so ``A^+ = A^T``.

    A stand-in for any exact-pseudo-inverse operator that depends on nothing
    of the toolkit (the core must accept any deepinv ``LinearPhysics``).
    """

    def __init__(self, image_shape: tuple[int, int, int], m: int, seed: int = 0):
        super().__init__()
        n = image_shape[0] * image_shape[1] * image_shape[2]
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        self.register_buffer("phi", q[:m].contiguous())
        self.image_shape = tuple(image_shape)

    def A(self, x, **kwargs):
        return x.reshape(x.shape[0], -1) @ self.phi.to(x.dtype).T

    def A_adjoint(self, y, **kwargs):
        return (y @ self.phi.to(y.dtype)).reshape(y.shape[0], *self.image_shape)

    def A_dagger(self, y, **kwargs):
        return self.A_adjoint(y)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Run the tests on one thread: tiny models are fastest so, and a shared 2-core CPU is not
    oversubscribed (OpenMP threads spinning against another process slow torch down many times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_shipped_models(request, monkeypatch, tmp_path_factory):
    """Tests see no shipped model unless marked ``@pytest.mark.shipped`` (the ones about the real weights),
    so a test's own models and error messages do not depend on what ``idm/weights`` holds."""
    if request.node.get_closest_marker("shipped") is None:
        from idm import shipped

        monkeypatch.setattr(shipped, "PACKAGED_DIR", tmp_path_factory.getbasetemp() / "no-shipped-models")
        monkeypatch.delenv(shipped.MODELS_ENV, raising=False)


@pytest.fixture
def ortho_op():
    """Factory: ``ortho_op((C, H, W), m)``."""
    return OrthoRowsOperator


def perturbed_model(config, seed: int = 0):
    """A float64 ``IDM(config)`` whose scalars are moved off their initial values (so no term vanishes)."""
    from idm import IDM

    torch.manual_seed(seed)
    model = IDM(config).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() < 50:
                p.add_(0.05 * torch.randn_like(p))
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """``||a - b|| / max(||b||, floor)``."""
    return ((a - b).norm() / max(b.norm().item(), floor, 1e-300)).item()


def saved_bytes_for_backward(run, params) -> int:
    """Bytes autograd saves for backward while ``run()`` executes, ``params`` excluded.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``.
    """
    excluded = {p.data_ptr() for p in params}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in excluded:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def host_reads(run) -> int:
    """How many times ``run()`` reads a tensor value back to Python (``.item()``, ``bool(t)``, ``if t:``).

    On a GPU each such read waits for every queued kernel (a host sync) and
    cannot be captured in a CUDA graph; counting them on the CPU finds them.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in reads:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Count.calls


def picture_folder(tmp_path, size: int):
    """``tmp_path / "pictures"`` holding one random grey ``size`` x ``size`` PNG (a magnitude image)."""
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.fromarray((np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)).save(pictures / "a.png")
    return pictures
