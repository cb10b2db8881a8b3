"""Families of operators: one model trained for many forward models (``"family"``).

The measurement injectors see ``A``, so one IDM can serve a whole range of
sampling ratios or several mask kinds (paper Table 7). An
:class:`OperatorFamily` is the distribution training draws from:

    import operators
    from operators.family import OperatorFamily, Component
    fam = OperatorFamily([Component({"name": "cs", "img_size": [64, 64], "ratio": 0.1, "mode": "permuted"},
                                    vary={"ratio": (0.01, 0.5)})])
    op = fam.resample(seed)            # a CS operator, ratio ~ U(0.01, 0.5), fresh permutation
    fam.mismatches({"ratio": 0.3})     # [] : the family covers it
    fam.A(x)                           # the representative: the first component's base operator

Each :class:`Component` is a base operator config plus the settings that
vary: a ``(low, high)`` pair draws uniformly from that interval, a list
draws one of its values. A draw picks a component (``weights``), the varied
settings, and a fresh ``seed`` for the operator's own random parts.

The family is itself an :class:`~operators.base.Operator`: it acts as its
representative (used for shape checks and validation during training), and
its :meth:`config` round-trips through :func:`operators.from_config`, so a
training checkpoint records the whole family and ``idm reconstruct`` /
``idm benchmark`` accept any request inside it (:func:`config_mismatches`).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from . import register
from .base import Operator, OperatorInputError, has_exact_pinv, has_linear_pinv

#: Settings never compared between a recorded operator and a request (each image has its own).
UNCOMPARED = ("img_size", "seed")


def without_size_and_seed(config: Mapping[str, Any]) -> dict[str, Any]:
    """An operator ``config`` without its :data:`UNCOMPARED` settings: what says which operator it is,
    whatever the image size and the random draw."""
    return {k: v for k, v in config.items() if k not in UNCOMPARED}


@functools.cache  # asked at every training draw; a registered name never changes its class
def _takes_seed(name: str) -> bool:
    """Whether the operator registered as ``name`` has a ``seed`` argument (random parts of its own)."""
    from . import REGISTRY

    return "seed" in inspect.signature(REGISTRY.get(name)).parameters


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_ends(spec: tuple[float, float]) -> tuple[int, int]:
    """The lowest and highest integer of the range ``(low, high)``: what an integer setting draws between."""
    return math.ceil(spec[0]), math.floor(spec[1])


def same_setting(a: Any, b: Any) -> bool:
    """Equal operator settings. A float is compared with a relative tolerance of 1e-6, so that a value that
    went through float32 (0.3 -> 0.30000001192...) is still the same setting; integers (seeds, sizes) and
    bools exactly; a recorded user mask equals a mask file (or array) that keeps the same pixels."""
    from operators.inpainting import is_packed_mask, same_mask

    if is_packed_mask(a) and not is_packed_mask(b):  # a recorded user mask, and the file (or array) it came from
        return same_mask(a, b)
    if is_packed_mask(b) and not is_packed_mask(a):
        return same_mask(b, a)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    return a == b


@dataclass(frozen=True)
class Component:
    """One kind of operator in a family.

    Attributes:
        base: a full operator config (``op.config()``-style, with ``"name"``
            and ``"img_size"``).
        vary: setting -> ``(low, high)`` (uniform draw; a tuple) or a list of
            allowed values (uniform choice).
        weight: relative probability of drawing this component.
    """

    base: Mapping[str, Any]
    vary: Mapping[str, Any] = field(default_factory=dict)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.base, Mapping) or "name" not in self.base:
            raise OperatorInputError(f"a family component's base must be an operator config with a 'name', got {self.base!r:.200}")
        vary = {}
        for key, spec in dict(self.vary).items():
            if isinstance(spec, tuple) and len(spec) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec
            ):
                low, high = float(spec[0]), float(spec[1])
                if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                    raise OperatorInputError(f"family range for {key!r} must be finite with low <= high, got {spec!r}")
                lowest, highest = _integer_ends((low, high))
                if _is_int(self.base.get(key)) and lowest > highest:
                    raise OperatorInputError(f"family range for the integer setting {key!r} holds no integer: {spec!r}")
                vary[key] = (low, high)
            elif isinstance(spec, list) and spec:
                vary[key] = list(spec)
            else:
                raise OperatorInputError(
                    f"family setting {key!r} must vary over a (low, high) tuple or a non-empty list of values, got {spec!r}"
                )
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise OperatorInputError(f"a family component's weight must be positive, got {self.weight!r}")
        object.__setattr__(self, "base", dict(self.base))
        object.__setattr__(self, "vary", vary)

    def draw(self, generator: torch.Generator, seed: int) -> dict[str, Any]:
        """A concrete operator config: varied settings drawn with ``generator``, ``seed`` for its random parts.

        A range over a setting whose base value is an integer (``views``,
        ``acceleration``) draws integers, each of ``ceil(low)..floor(high)``
        equally likely. ``seed`` is set for operators that take one, also where
        the base config has none because its own draw is not random (a centred
        box whose ``box_position`` varies to ``"random"``); not for CT's
        projector, which has no random part.
        """
        config = dict(self.base)
        for key, spec in self.vary.items():
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if isinstance(spec, tuple) and _is_int(self.base.get(key)):
                low, high = _integer_ends(spec)
                config[key] = min(low + int(u * (high - low + 1)), high)
            elif isinstance(spec, tuple):
                config[key] = spec[0] + u * (spec[1] - spec[0])
            else:
                config[key] = spec[min(int(u * len(spec)), len(spec) - 1)]
        if "seed" in self.base or _takes_seed(self.base["name"]):
            config["seed"] = int(seed)
        return config

    def mismatches(self, request: Mapping[str, Any]) -> list[str]:
        """Why this component cannot serve ``request`` (setting -> value); ``[]`` if it can.

        Settings the base config does not have (e.g. ``ratio`` for a box
        mask) and :data:`UNCOMPARED` ones are not part of the operator's
        identity and are skipped.
        """
        problems = []
        for key, want in request.items():
            if key in UNCOMPARED or (key not in self.base and key not in self.vary):
                continue
            spec = self.vary.get(key)
            if isinstance(spec, tuple):
                ok = isinstance(want, (int, float)) and not isinstance(want, bool) and (
                    spec[0] - 1e-9 <= float(want) <= spec[1] + 1e-9
                )
                have = f"{spec[0]:g}..{spec[1]:g}"
            elif isinstance(spec, list):
                ok = any(same_setting(v, want) for v in spec)
                have = " or ".join(repr(v) for v in spec)
            else:
                have = self.base.get(key, "<not set>")
                ok = same_setting(have, want)
                have = _shown(have)
            if not ok:
                problems.append(f"operator {key}: trained with {have}, requested {_shown(want)}")
        return problems

    def to_json(self) -> dict[str, Any]:
        vary = {k: list(v) if isinstance(v, tuple) else {"choices": list(v)} for k, v in self.vary.items()}
        return {"base": dict(self.base), "vary": vary, "weight": self.weight}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Component":
        try:
            vary = {
                k: list(v["choices"]) if isinstance(v, Mapping) else tuple(v) for k, v in dict(data.get("vary", {})).items()
            }
            return cls(dict(data["base"]), vary, float(data.get("weight", 1.0)))
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # AttributeError: data not a mapping
            raise OperatorInputError(f"malformed operator family component {data!r:.200}: {err}") from None


def _shown(value: Any) -> str:
    """A setting as messages show it: a mask array (a file's, packed) by its size, other long values cut."""
    if isinstance(value, Mapping) and "packbits" in value:
        return f"a {'x'.join(map(str, value.get('shape') or []))} mask array (a mask file)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@register("family")
class OperatorFamily(Operator):
    """A distribution over operators (see the module docstring).

    Args:
        components: :class:`Component` values (or their JSON dicts); all must
            act on images of one shape.
        seed: the seed the family was built with (recorded; each draw has its own).

    ``A`` / ``A_adjoint`` / ``A_dagger`` are those of the representative (the
    first component's base operator); :meth:`resample` gives members.
    """

    def __init__(self, components: Sequence[Component | Mapping[str, Any]], seed: int = 0, **kwargs: Any):
        comps = [c if isinstance(c, Component) else Component.from_json(c) for c in components]
        if not comps:
            raise OperatorInputError("an operator family needs at least one component")
        from . import from_config

        prototypes = [from_config(comp.base) for comp in comps]
        for prototype, comp in zip(prototypes, comps):  # a misspelt setting named now, not at the first draw
            settings = {k: v for k, v in {**comp.base, **comp.vary}.items() if k != "name"}
            type(prototype).check_settings(settings, f"family component {comp.base['name']!r}'s settings")
        representative = prototypes[0]
        shape = representative.image_shape
        for other in prototypes[1:]:
            if other.image_shape != shape:
                raise OperatorInputError(
                    f"family components act on images of different shapes: {shape} and {other.image_shape}"
                )
        super().__init__(representative.img_hw, representative.channels, **kwargs)
        self.representative = representative
        self.prototypes = prototypes  # each component's base operator: draws are its variants
        self.components = comps
        self.seed = int(seed)

    @property
    def exact_pinv(self) -> bool:
        """The representative's: :meth:`A_dagger` is its ``A_dagger`` (a family of CT operators has FBP, not a
        pseudo-inverse, so the final projection solves least squares for it as for a single CT operator)."""
        return has_exact_pinv(self.representative)

    @property
    def linear_pinv(self) -> bool:
        """The representative's (:func:`operators.has_linear_pinv`): :meth:`A_dagger` is its ``A_dagger``."""
        return has_linear_pinv(self.representative)

    def measurement_shape(self) -> tuple[int, ...]:
        return self.representative.measurement_shape()

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.representative.A(x)

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.representative.A_adjoint(y)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.representative.A_dagger(y)

    def check_draws(self) -> None:
        """Build each component at both ends of each range it varies (the integers nearest inside, for an integer
        setting) and at each listed value: an :class:`OperatorInputError` for a value its operator refuses
        (``ratio`` above 1, ``views`` of 0), now rather than at a draw mid-training. Costs one construction
        per value checked (seconds each for CT projectors at 256x256), so training calls it once, at the start."""
        for prototype, comp in zip(self.prototypes, self.components):
            for key, spec in comp.vary.items():
                if isinstance(spec, list):
                    values = spec
                elif _is_int(comp.base.get(key)):
                    values = list(_integer_ends(spec))
                else:
                    values = list(spec)
                for value in values:
                    prototype.variant({**comp.base, key: value})

    def resample(self, seed: int) -> Operator:
        """A member drawn from ``seed``: component, varied settings and the operator's own random parts."""
        gen = torch.Generator().manual_seed(int(seed))
        weights = torch.tensor([c.weight for c in self.components], dtype=torch.float64)
        index = int(torch.multinomial(weights, 1, generator=gen)) if len(self.components) > 1 else 0
        return self.prototypes[index].variant(self.components[index].draw(gen, seed))

    def mismatches(self, request: Mapping[str, Any]) -> list[str]:
        """``[]`` when some component serves ``request``, else the closest component's problems."""
        return _closest_mismatches(self.components, request)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "components": [c.to_json() for c in self.components], "seed": self.seed}

    def extra_repr(self) -> str:
        return f"{len(self.components)} component(s) of {self.representative.name}"


def is_family_config(recorded: Mapping[str, Any] | None) -> bool:
    """Whether a recorded operator config (``op.config()``) is that of an :class:`OperatorFamily`."""
    return (recorded or {}).get("name") == OperatorFamily.name


def config_mismatches(recorded: Mapping[str, Any], request: Mapping[str, Any]) -> list[str]:
    """Why an operator recorded with a model (``op.config()``) cannot serve ``request``.

    ``recorded`` is a plain operator config (every requested setting must be
    equal) or a family config (some component must cover the request).
    ``img_size`` and ``seed`` are not compared. Returns ``[]`` when it can.
    """
    components = [Component.from_json(c) for c in recorded.get("components", [])] if is_family_config(recorded) else [Component(dict(recorded))]
    return _unknown_settings({str(c.base.get("name")) for c in components}, request) or _closest_mismatches(components, request)


def serving_share(recorded: Mapping[str, Any], request: Mapping[str, Any]) -> float:
    """The share of a recorded operator's training draws that were of the requested kind, in ``[0, 1]``.

    A family's components that serve ``request`` (:meth:`Component.mismatches`),
    each by its ``weight``, over all of them: a model trained on random
    masks one draw in three and boxes two in three has ``1/3`` for a random
    mask, one trained on random masks alone ``1``. A plain config: ``1`` when
    it serves ``request``, else ``0``. How :mod:`idm.shipped` chooses between
    two family models that both serve a request.
    """
    if config_mismatches(recorded, request):
        return 0.0
    if not is_family_config(recorded):
        return 1.0
    components = [Component.from_json(c) for c in recorded.get("components", [])]
    total = sum(c.weight for c in components)
    return sum(c.weight for c in components if not c.mismatches(request)) / total


def _unknown_settings(names: set[str], request: Mapping[str, Any]) -> list[str]:
    """A problem for each requested setting that no operator class of ``names`` takes (a misspelt key would
    otherwise be skipped as a setting the recorded variant lacks, and every model would serve it). Operators
    not registered here, or whose constructor takes ``**kwargs``, are not checked."""
    import operators

    if not names:  # an empty family: _closest_mismatches says so
        return []
    known = {"name", *UNCOMPARED}
    for name in names:
        try:
            parameters = inspect.signature(operators.REGISTRY.get(name).__init__).parameters
        except (KeyError, ValueError, TypeError, OperatorInputError):
            return []
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return []
        known |= set(parameters) - {"self"}
    settings = ", ".join(sorted(k for k in known - {"name", *UNCOMPARED} if not k.startswith("_")))
    return [f"operator {key}: not a setting of the {' / '.join(sorted(names))} operator (its settings: {settings})"
            for key in request if key not in known]


def _closest_mismatches(components: Sequence[Component], request: Mapping[str, Any]) -> list[str]:
    """``[]`` when some component serves ``request``, else the problems of the closest one."""
    if not components:
        return ["operator: the recorded family is empty"]
    return min((comp.mismatches(request) for comp in components), key=len)


def representative_config(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The concrete operator config a recorded operator stands for: a family's first base, else itself."""
    if is_family_config(recorded):
        comps = recorded.get("components") or []
        if not comps:
            raise OperatorInputError("the recorded operator family is empty")
        return dict(Component.from_json(comps[0]).base)
    return dict(recorded)
