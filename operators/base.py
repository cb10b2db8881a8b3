"""The plug-in interface every forward model of the toolkit implements.

An :class:`Operator` is a :class:`deepinv.physics.LinearPhysics` (so deepinv's
solvers and any deepinv linear physics interoperate with ours) that also

* knows the image shape it acts on (``channels``, ``img_size``) and checks its
  inputs, raising :class:`OperatorInputError` with a message that names the
  problem instead of a shape error from deep inside torch;
* carries its whole state in a small JSON-able dict (:meth:`config`), from
  which :func:`operators.from_config` rebuilds the identical operator;
* can draw a fresh random instance of itself (:meth:`resample`), which training
  uses to see a new permutation / mask at every iteration.

Tensors: images are float ``(B, C, H, W)``; the measurement layout is each
operator's own (documented in its class). Buffers live on the CPU in float64
and are used on the device and dtype of the input, converted on first use
and kept (:meth:`Operator.cast_like`), so one operator object serves CPU
and GPU, float32 and float64 alike.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, ClassVar

import torch
from deepinv.physics import LinearPhysics

from .value_checks import values_checked


class OperatorInputError(ValueError):
    """A tensor or argument given to an operator is not what it expects."""


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """Return ``ratio`` as a float after checking that it lies in (0, 1]."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise OperatorInputError(f"{name} must be a number in (0, 1], got {ratio!r}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise OperatorInputError(f"{name} must be in (0, 1], got {ratio!r}")
    return value


def check_int(value: Any, name: str) -> int:
    """Return ``value`` as a Python int (numpy ints accepted, bools not), or raise."""
    if isinstance(value, bool):
        raise OperatorInputError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise OperatorInputError(f"{name} must be an integer, got {value!r}") from None


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as a Python int >= 1 (see :func:`check_int`), or raise."""
    number = check_int(value, name)
    if number <= 0:
        raise OperatorInputError(f"{name} must be a positive integer, got {value!r}")
    return number


def _check_not_empty(t: torch.Tensor, name: str) -> None:
    if t.shape[0] == 0:
        raise OperatorInputError(f"{name} is an empty batch (shape {tuple(t.shape)}): nothing to measure or reconstruct")


def check_seed(value: Any, name: str = "seed") -> int:
    """Return ``value`` as an int in ``[0, 2**32)``, the range every random source here takes (numpy's
    ``RandomState`` is the narrowest), or raise."""
    number = check_int(value, name)
    if not 0 <= number < 2**32:
        raise OperatorInputError(f"{name} must be in [0, 2**32), got {value!r}")
    return number


def check_img_size(img_size: Any) -> tuple[int, int]:
    """Return ``img_size`` as ``(H, W)`` positive ints (ints or integer tensors/arrays, not 8.7 or True), or raise."""
    try:
        h, w = img_size
    except (TypeError, ValueError):
        raise OperatorInputError(f"img_size must be (H, W), got {img_size!r}") from None
    h, w = check_int(h, "img_size height"), check_int(w, "img_size width")
    if h <= 0 or w <= 0:
        raise OperatorInputError(f"img_size must be positive, got {img_size!r}")
    return h, w


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise :class:`OperatorInputError` unless ``t`` is a floating-point tensor without NaN or inf.

    The NaN/inf part (one read-back from the device) is skipped inside
    :func:`operators.unchecked_values`.
    """
    if not torch.is_tensor(t):
        raise OperatorInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point() and not t.is_complex():
        raise OperatorInputError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if values_checked() and not torch.isfinite(t).all():
        raise OperatorInputError(f"{name} contains NaN or inf values")


def image_shape_of(op: Any, y: torch.Tensor) -> tuple[int, ...]:
    """``(C, H, W)`` of the images ``op`` acts on: its ``image_shape`` where it has one (the toolkit's
    operators), else the shape ``op.A_adjoint(y)`` has (any other deepinv physics; ``y`` its measurements,
    any batch size). The caller chooses autograd and the errors around that call."""
    shape = getattr(op, "image_shape", None)
    if shape is None:
        shape = op.A_adjoint(y).shape[1:]
    return tuple(shape)


def check_measurements_for(op: Any, y: torch.Tensor) -> None:
    """``op.check_measurement(y)`` (shape, NaN/inf) where ``op`` has one, as the toolkit's operators do;
    for other deepinv physics, that ``y`` is a floating-point tensor without NaN or inf (:func:`check_finite`).
    For code that checks ``y`` once and then calls ``op`` inside :func:`operators.unchecked_values`."""
    check = getattr(op, "check_measurement", None)
    if callable(check):
        check(y)
    else:  # any other physics: what every measurement must be (its shape only the physics itself can tell)
        check_finite(y, "y")


def check_float32_or_64(t: torch.Tensor, operator_name: str, name: str) -> None:
    """Raise :class:`OperatorInputError` unless ``t`` is float32 or float64 (what FFTs and sparse products take)."""
    if t.dtype not in (torch.float32, torch.float64):
        raise OperatorInputError(f"{operator_name} supports float32 and float64 tensors, got {name} of dtype {t.dtype}")


def has_exact_pinv(op: Any) -> bool:
    """Whether ``op.A_dagger`` is a pseudo-inverse, so that ``x + A^+ (y - A x)`` projects onto ``{x : A x = y}``:
    ``op.exact_pinv`` where the operator says (the toolkit's operators do; CT's filtered back-projection is not
    one), else true. deepinv's physics say nothing, and their ``A_dagger`` is a pseudo-inverse: closed-form for a
    ``DecomposablePhysics`` (masks, MRI, FFT blur), otherwise a least-squares solve that is as exact as the
    physics' own ``max_iter`` and ``tol`` make it. A plug-in whose ``A_dagger`` only approximates an inverse
    declares ``exact_pinv = False``."""
    return bool(getattr(op, "exact_pinv", True))


def has_linear_pinv(op: Any) -> bool:
    """Whether ``op.A_dagger`` is a fixed linear map of ``y`` (a pseudo-inverse in closed form, FBP), so that
    inputs equal up to rounding give outputs equal up to rounding: what the memory-saving backward needs, as it
    recomputes ``A_dagger`` on inputs rebuilt by inverting the wiring. ``op.linear_pinv`` where the operator
    says (CT with ``pinv="cg"`` says no: conjugate gradients stopped at a tolerance amplify rounding many
    orders of magnitude on an ill-posed problem), else true."""
    return bool(getattr(op, "linear_pinv", True))


def kept_between_calls() -> torch.inference_mode:
    """The context in which an operator makes the tensors it keeps between calls (a buffer converted to a device
    and dtype, a projector, a filter): outside inference mode, even when the first call runs inside it. Inference
    tensors kept there would make every later call with autograd fail ("Inference tensors cannot be saved for
    backward"), e.g. training after a validation pass under ``torch.inference_mode()``."""
    return torch.inference_mode(False)


class Operator(LinearPhysics):
    """Base class of the toolkit's forward models (see module docstring).

    Subclasses set :attr:`name` (the registry key), implement :meth:`A`,
    :meth:`A_adjoint`, :meth:`A_dagger`, :meth:`measurement_shape` and
    :meth:`config`, and are registered with :func:`operators.register`.

    Args:
        img_size: ``(H, W)`` of the images the operator acts on.
        channels: ``C`` of the images.
    """

    name: ClassVar[str] = ""

    @property
    def exact_pinv(self) -> bool:
        """Whether :meth:`A_dagger` is the exact pseudo-inverse (``A A^+ A = A``); CT's FBP is not."""
        return True

    @property
    def linear_pinv(self) -> bool:
        """Whether :meth:`A_dagger` is a fixed linear map of ``y`` (see :func:`has_linear_pinv`); an iterative
        solve that stops at a tolerance is not."""
        return True

    def __init__(self, img_size: tuple[int, int], channels: int, **kwargs):
        super().__init__(**kwargs)
        self.img_hw = check_img_size(img_size)
        self.channels = check_positive_int(channels, "channels")
        self._casts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cast_like(self, buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``buffer`` (a CPU tensor of this operator) on ``like``'s device, in ``like``'s real dtype
        (complex inputs map to their real dtype; integer buffers keep theirs).

        Converted on first use per device and dtype and kept: a copy to the GPU
        on every call would wait for the GPU each time (and could not be
        captured in a CUDA graph). ``buffer`` must not change in place. The
        copy is made outside inference mode (:func:`kept_between_calls`).
        """
        dtype = like.real.dtype if like.is_complex() else like.dtype
        dtype = dtype if buffer.is_floating_point() else buffer.dtype
        key = (id(buffer), like.device, dtype)
        cached = self._casts.get(key)
        if cached is None or cached[0] is not buffer:
            with kept_between_calls():
                cached = self._casts[key] = (buffer, buffer.to(device=like.device, dtype=dtype))
        return cached[1]

    @property
    def label(self) -> str:
        """The name messages give this operator: its registry name, else (not registered) its class name."""
        return self.name or type(self).__name__

    # ---- shapes and checks -------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.channels, *self.img_hw)

    def measurement_shape(self) -> tuple[int, ...]:
        """Shape of the measurement of one image (without the batch dim)."""
        raise NotImplementedError

    def check_image(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise :class:`OperatorInputError` unless ``x`` is ``(B, C, H, W)`` and finite."""
        check_finite(x, name)
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise OperatorInputError(
                f"{name} must have shape (B, {', '.join(map(str, self.image_shape))}) for this "
                f"{self.label} operator, got {tuple(x.shape)}"
            )
        _check_not_empty(x, name)

    def check_measurement(self, y: torch.Tensor, name: str = "y") -> None:
        """Raise :class:`OperatorInputError` unless ``y`` has this operator's measurement shape."""
        check_finite(y, name)
        shape = self.measurement_shape()
        if y.dim() != len(shape) + 1 or tuple(y.shape[1:]) != tuple(shape):
            raise OperatorInputError(
                f"{name} must have shape (B, {', '.join(map(str, shape))}) for this {self.label} "
                f"operator, got {tuple(y.shape)}"
            )
        _check_not_empty(y, name)

    # ---- state ---------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Full state as a small JSON-able dict with key ``"name"``."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Operator":
        """Rebuild the operator from :meth:`config` output (``"name"`` ignored); a setting the operator does
        not take, or a missing one, is an :class:`OperatorInputError` that names it."""
        kwargs = {k: v for k, v in config.items() if k != "name"}
        cls.check_settings(kwargs, "this config")
        return cls(**kwargs)

    @classmethod
    def ignored_settings(cls, settings: dict[str, Any]) -> dict[str, str]:
        """The keyword arguments among ``settings`` that the operator they build would not use (one of its
        variants ignores them), each with why; none by default. Commands refuse a flag named here, which
        would otherwise change nothing, silently."""
        return {}

    @classmethod
    def check_settings(cls, settings: dict[str, Any], what: str = "these keyword arguments") -> None:
        """Raise :class:`OperatorInputError` for ``settings`` (constructor keyword arguments) that name one the
        operator does not take or leave out a required one; the message lists the operator's settings."""
        try:
            cls._bind(settings)
        except TypeError as err:
            takes = ", ".join(name for name in inspect.signature(cls).parameters if not name.startswith("_"))
            raise OperatorInputError(f"the {cls.name!r} operator cannot be built from {what}: {err} (its settings: "
                                     f"{takes})") from None  # fmt: skip

    def variant(self, config: dict[str, Any]) -> "Operator":
        """The operator of ``config`` (same kind, other settings), reusing this one's precomputed parts where it can.

        The default returns this operator itself when ``config`` is its own
        (operators do not change after construction), else rebuilds it from
        scratch; operators with costly set-up (e.g. the orthogonal bases of
        CS) override it. Operator families call it for every training draw.
        """
        if self._settings(config) == self._settings(self.config()):
            return self
        return type(self).from_config(config)

    @classmethod
    def _settings(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        """Every constructor setting that ``config`` makes (defaults filled in), to compare two configs;
        ``None`` when it does not fit the constructor (building it then names the problem)."""
        try:
            bound = cls._bind(config)
        except TypeError:
            return None
        bound.apply_defaults()
        return dict(bound.arguments)

    @classmethod
    def _bind(cls, settings: dict[str, Any]) -> inspect.BoundArguments:
        """``settings`` (a config's ``"name"`` left out) bound to the constructor's parameters; a ``TypeError``
        for a setting it does not take or a required one missing."""
        return inspect.signature(cls).bind(**{k: v for k, v in settings.items() if k != "name"})

    def resample(self, seed: int) -> "Operator":
        """A new operator of the same kind with its random parts redrawn from ``seed``.

        Operators without random parts return ``self``.
        """
        cfg = self.config()
        if "seed" not in cfg:
            return self
        return type(self).from_config({**cfg, "seed": int(seed)})

    def extra_repr(self) -> str:
        try:
            config = self.config()
        except NotImplementedError:  # a subclass without a config yet: print it all the same
            return f"img_size={self.img_hw}, channels={self.channels}"
        cfg = {k: v for k, v in config.items() if k != "name" and not isinstance(v, (list, dict))}
        return ", ".join(f"{k}={v!r}" for k, v in cfg.items())

