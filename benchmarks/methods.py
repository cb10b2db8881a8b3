"""The reconstruction methods the benchmark harness compares, behind one interface.

Every method is a small object with

* ``name`` -- a short string (``"pinv"``, ``"tv"``, ``"ddnm"``, ``"dps"``, ...);
* ``nfe`` -- U-Net (neural function) evaluations per image (0 for classical);
* ``__call__(y, op, generator=None) -> x_hat`` -- measurements ``y`` in the
  layout of the deepinv ``LinearPhysics`` ``op``, reconstruction ``(B, C, H, W)``
  in the image space ([0, 1] for natural images; not clamped unless the
  method's authors clamp). All randomness comes from ``generator`` (a
  ``torch.Generator``; ``None`` means a fresh one seeded 0), never from the
  global RNG, so a rerun gives the same numbers.

All diffusion baselines share ONE prior (:class:`benchmarks.prior.DiffusionPrior`,
loaded with :func:`benchmarks.prior.load_prior`) and the same operator::

    prior = load_prior("priors/natural-gray", device="cuda")
    for name in available_methods():
        method = make_method(name, prior=prior)          # options: make_method("ddnm", prior, steps=20)
        x_hat = method(y, op, generator=torch.Generator("cuda").manual_seed(0))

``make_method`` also accepts an object that already has the interface (for
example the harness's IDM wrapper) and returns it after checking it.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from benchmarks.prior import DiffusionPrior


@runtime_checkable
class Method(Protocol):
    """What the harness needs from a reconstruction method."""

    name: str
    nfe: int

    def __call__(self, y: Tensor, op: Any, generator: torch.Generator | None = None) -> Tensor: ...


def _builders() -> dict[str, tuple[bool, Callable[..., Method]]]:
    """``name -> (needs a prior, builder(prior, **options))``, in the harness's display order."""
    from benchmarks.classical import TV
    from benchmarks.ddnm import DDNM
    from benchmarks.dps import DPS
    from benchmarks.pinv import PseudoInverse

    return {
        "pinv": (False, lambda prior, **o: PseudoInverse(**o)),
        "tv": (False, lambda prior, **o: TV(**o)),
        "ddnm": (True, lambda prior, **o: DDNM(prior, **o)),
        "dps": (True, lambda prior, **o: DPS(prior, **o)),
        # "idm" is not built here: the harness wraps a trained idm.IDM in an object with
        # the Method interface and passes that object to make_method (or uses it directly).
    }


def available_methods() -> list[str]:
    """Names :func:`make_method` can build: ``["pinv", "tv", "ddnm", "dps"]``."""
    return list(_builders())


def needs_prior(name: str) -> bool:
    """Whether method ``name`` needs a diffusion prior."""
    builders = _builders()
    if name not in builders:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(builders)}")
    return builders[name][0]


def check_method(method: Any) -> Method:
    """Return ``method`` if it has the interface (``name``, ``nfe``, callable), else raise TypeError."""
    missing = [a for a in ("name", "nfe") if not hasattr(method, a)]
    if missing or not callable(method):
        what = ", ".join(missing + ([] if callable(method) else ["__call__"]))
        raise TypeError(f"{type(method).__name__} is not a reconstruction method: it lacks {what}")
    return method


def make_method(name: str | Method, prior: DiffusionPrior | None = None, **options: Any) -> Method:
    """Build a method by name, with its options; or check and return a ready method object.

    Args:
        name: one of :func:`available_methods`, or an object with the
            :class:`Method` interface (returned as is; ``options`` must be empty).
        prior: the diffusion prior, required by ``ddnm`` and ``dps`` (ignored by the others).
        options: the method's own keyword arguments, e.g. ``steps=``, ``eta=``
            (ddnm), ``zeta=`` (dps), ``lam=`` / ``iters=`` (tv), ``progress=False``.
    """
    if not isinstance(name, str):
        if options:
            raise TypeError("options can only be given with a method name")
        return check_method(name)
    builders = _builders()
    if name not in builders:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(builders)}")
    wants_prior, build = builders[name]
    if wants_prior and prior is None:
        raise ValueError(f"method {name!r} needs a diffusion prior (benchmarks.prior.load_prior(folder))")
    return build(prior, **options)
