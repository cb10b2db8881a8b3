"""Does a forward model keep the contract the toolkit relies on? :func:`check_operator` says.

IDM, its training, measurement files and checkpoints assume of every
:class:`~operators.base.Operator` that

* ``A(x)`` has the shape :meth:`measurement_shape` announces and ``x``'s real dtype;
* ``A_adjoint`` is the adjoint of ``A``: ``<A x, y> = <x, A^T y>``;
* ``A_dagger`` maps measurements to real images of ``x``'s shape and dtype and,
  where :attr:`exact_pinv` is true, is a pseudo-inverse: ``A A^+ (A x) = A x`` and ``A^+ A`` symmetric;
* :meth:`config` is JSON and, for a registered operator, rebuilds the same operator
  (:func:`operators.from_config`), which is how a measurement file or a checkpoint brings it back.

The toolkit's own operators are tested for all of this; ``idm train``,
:func:`idm.train.train` and ``idm simulate`` run the check on any other
(:func:`check_plugin_operator`) before they use or record it, so that a slip in a new
operator (a setting left out of ``config()``, a missing ``.real``) is named at
once instead of giving wrong reconstructions later. Run it in your own tests too.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch

from .base import Operator, OperatorInputError

#: Relative tolerance of the numerical checks per probe dtype.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}


def check_operator(op: Operator, dtype: torch.dtype = torch.float64, batch: int = 2, seed: int = 0) -> None:
    """Raise :class:`OperatorInputError` listing every way ``op`` breaks the operator contract (module docstring).

    Probes with ``batch`` random images in [0, 1] of ``op.image_shape`` and
    ``dtype`` (float64 by default, for tight tolerances: :data:`TOLERANCES`),
    on the CPU. Costs a few applications of ``A``, ``A_adjoint`` and ``A_dagger``
    and one rebuild of the operator from its config.
    """
    if not isinstance(op, Operator):
        raise TypeError(f"check_operator takes an operators.Operator, got {type(op).__name__}")
    tolerance = TOLERANCES.get(dtype)
    if tolerance is None:
        raise ValueError(f"check_operator probes in float32 or float64, not {dtype}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *op.image_shape, generator=generator, dtype=dtype)
    problems: list[str] = []
    label = f"the {op.label} operator"

    def apply(what: str, method: Callable, argument: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
        """``method(argument)``, or ``None`` with a problem noted when it fails or gives another shape or dtype."""
        try:
            out = method(argument)
        except Exception as err:  # any failure is the finding
            problems.append(f"{what} failed on a {tuple(argument.shape)} {argument.dtype} input: {type(err).__name__}: {err}")
            return None
        if not torch.is_tensor(out) or out.is_complex() or out.dtype != dtype or tuple(out.shape) != shape:
            got = f"{tuple(out.shape)} {out.dtype}" if torch.is_tensor(out) else type(out).__name__
            problems.append(f"{what} returned {got}; expected {shape} {dtype} (real, the input's dtype)")
            return None
        return out

    try:
        measured = (batch, *op.measurement_shape())
    except Exception as err:  # any failure is the finding
        problems.append(f"measurement_shape() failed: {type(err).__name__}: {err}")
        measured = None
    y = None if measured is None else apply("A", op.A, x, measured)
    if y is not None:
        probe = torch.rand(y.shape, generator=generator, dtype=dtype)
        adjoint = apply("A_adjoint", op.A_adjoint, probe, tuple(x.shape))
        if adjoint is not None:
            left, right = float((y * probe).sum()), float((x * adjoint).sum())
            if abs(left - right) > tolerance * max(abs(left), abs(right), 1e-30):
                problems.append(f"A_adjoint is not the adjoint of A: <A x, y> = {left:.10g} but <x, A_adjoint y> = "
                                f"{right:.10g}")  # fmt: skip
        inverse = apply("A_dagger", op.A_dagger, y, tuple(x.shape))
        if inverse is not None and op.exact_pinv:
            residual = _relative_error(op.A(inverse), y)
            if residual > tolerance:
                problems.append(f"A_dagger is not a pseudo-inverse: ||A A_dagger (A x) - A x|| / ||A x|| = {residual:.3g} "
                                "(declare exact_pinv False for an approximate inverse)")  # fmt: skip
            else:
                problems += _projector_problems(op, x, inverse, generator, tolerance)
    problems += _config_problems(op, x, y, tolerance)
    if problems:
        raise OperatorInputError(f"{label} breaks the operator contract:\n  - " + "\n  - ".join(problems))


def _projector_problems(op: Operator, x: torch.Tensor, projected: torch.Tensor, generator: torch.Generator,
                        tolerance: float) -> list[str]:  # fmt: skip
    """``A_dagger A`` must be symmetric, ``<P x, z> = <x, P z>``: with ``A A_dagger A = A`` that makes it the
    orthogonal projection onto the row space, so that ``x + A_dagger (y - A x)`` is the nearest point with
    ``A x = y`` (what IDM's steps and final projection assume). A right inverse such as nearest-neighbour
    upsampling for a decimation passes ``A A_dagger A = A`` but not this. ``projected`` is ``P x``."""
    z = torch.rand(x.shape, generator=generator, dtype=x.dtype)
    left, right = float((projected * z).sum()), float((x * op.A_dagger(op.A(z))).sum())
    if abs(left - right) <= tolerance * float(x.norm() * z.norm()):
        return []
    return [f"A_dagger A is not symmetric: <A_dagger A x, z> = {left:.10g} but <x, A_dagger A z> = {right:.10g}, so "
            "A_dagger is not the pseudo-inverse and x + A_dagger (y - A x) is not the nearest image with A x = y "
            "(use A^T (A A^T)^-1, or declare exact_pinv False)"]  # fmt: skip


def _config_problems(op: Operator, x: torch.Tensor, y: torch.Tensor | None, tolerance: float) -> list[str]:
    """What is wrong with ``op.config()``: not a dict naming the operator, not JSON, or not rebuilding ``op``."""
    from . import REGISTRY, from_config

    try:
        config = op.config()
    except Exception as err:  # any failure is the finding
        return [f"config() failed: {type(err).__name__}: {err}"]
    if not isinstance(config, dict) or config.get("name") != op.name:
        return [f"config() must return a dict with 'name': {op.name!r}, got {config!r:.200}"]
    try:
        text = json.dumps(config)
    except (TypeError, ValueError) as err:
        return [f"config() is not JSON (a measurement file or checkpoint could not record it): {err}"]
    if op.name not in REGISTRY.available():  # used from Python only: no file or checkpoint can rebuild it anyway
        return []
    try:
        rebuilt = from_config(json.loads(text))
    except Exception as err:
        return [f"operators.from_config(config()) failed: {type(err).__name__}: {err}"]
    if y is None:
        return []
    try:
        difference = _relative_error(rebuilt.A(x), y)
    except Exception as err:
        return [f"the operator rebuilt from config() failed on the same images: {type(err).__name__}: {err}"]
    if difference > tolerance:
        return [f"the operator rebuilt from config() measures differently (relative difference {difference:.3g}): "
                f"config() leaves out a setting, which files and checkpoints would then lose; it returned {config!r:.300}"]  # fmt: skip
    return []


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm().clamp_min(1e-30))


def check_plugin_operator(op: Any) -> None:
    """:func:`check_operator` in float32 for an operator of a plug-in (not the toolkit's own, which its tests
    cover), and for each base operator of an :class:`~operators.family.OperatorFamily` (rebuilt from configs:
    a setting a plug-in's ``config()`` left out is lost by then, so :meth:`tasks.Task.make_training_operator`
    checks each operator before its config stands for it); anything else (a deepinv physics) passes unchecked."""
    for each in getattr(op, "prototypes", None) or [op]:
        if isinstance(each, Operator) and type(each).__module__.partition(".")[0] != __package__:
            check_operator(each, dtype=torch.float32)  # what IDM runs in: an operator need not support float64
