"""Name -> operator class registry: ``register``, ``make``, ``available``, ``from_config``.

The registry is a plain dict owned by a :class:`OperatorRegistry` instance;
``operators`` exposes the one instance that the toolkit's own operators
register into, and users add theirs with ``@operators.register("name")``.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import Operator, OperatorInputError


class OperatorRegistry:
    """Maps operator names to :class:`~operators.base.Operator` subclasses."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Operator]] = {}

    def register(self, name: str) -> Callable[[type[Operator]], type[Operator]]:
        """Class decorator: make ``cls`` available as ``make(name, ...)``.

        A name can be registered once; the same class defined again (a
        notebook cell or a module run a second time: same module and
        qualified name) replaces the earlier definition.
        """

        def decorator(cls: type[Operator]) -> type[Operator]:
            if not (isinstance(cls, type) and issubclass(cls, Operator)):
                raise TypeError(f"register({name!r}) expects an operators.Operator subclass, got {cls!r}")
            known = self._classes.get(name)
            if known is not None and known is not cls and not _same_definition(known, cls):
                raise ValueError(
                    f"an operator named {name!r} is already registered ({known.__module__}.{known.__qualname__})"
                )
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorator

    def available(self) -> list[str]:
        """Sorted names of the registered operators."""
        return sorted(self._classes)

    def get(self, name: str) -> type[Operator]:
        """The class registered as ``name``; a clear error for unknown names."""
        try:
            return self._classes[name]
        except KeyError:
            raise OperatorInputError(
                f"unknown operator {name!r}; available: {', '.join(self.available())}"
            ) from None

    def make(self, name: str, **kwargs: Any) -> Operator:
        """Build the operator registered as ``name`` with ``kwargs``; a setting it does not take (or a required
        one missing) is an :class:`OperatorInputError` that names it."""
        cls = self.get(name)
        cls.check_settings(kwargs)
        return cls(**kwargs)

    def from_config(self, config: dict[str, Any]) -> Operator:
        """Rebuild an operator from ``op.config()`` (a dict with key ``"name"``)."""
        if not isinstance(config, dict) or not isinstance(config.get("name"), str):
            raise OperatorInputError(f"an operator config must be a dict with a 'name' string, got {config!r:.200}")
        return self.get(config["name"]).from_config(config)


def _same_definition(a: type, b: type) -> bool:
    """Whether ``b`` is ``a``'s code run again (same module and qualified name), not another class."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)
