"""Forward models for imaging inverse problems, as deepinv ``LinearPhysics``.

    import operators
    op = operators.make("cs", img_size=(H, W), channels=1, ratio=0.1)
    y = op.A(x); op.A_adjoint(y); op.A_dagger(y)
    operators.available()                   # registered names
    op2 = operators.from_config(op.config())  # identical operator
    operators.check_operator(op)            # adjoint, pseudo-inverse, shapes, config round trip

Add a forward model by subclassing :class:`operators.Operator` and decorating
it with ``@operators.register("name")`` (see README).
"""

from .base import (Operator, OperatorInputError, check_finite, check_img_size, check_measurements_for, check_ratio,
                   has_exact_pinv, has_linear_pinv, image_shape_of)
from .registry import OperatorRegistry
from .value_checks import unchecked_values, values_checked

REGISTRY = OperatorRegistry()
register = REGISTRY.register
make = REGISTRY.make
available = REGISTRY.available
from_config = REGISTRY.from_config

# The toolkit's own operators register themselves on import.
from . import cs, inpainting, mri, ct, family  # noqa: E402,F401
from .family import without_size_and_seed  # noqa: E402
from .conformance import check_operator  # noqa: E402

__all__ = [
    "Operator",
    "OperatorInputError",
    "OperatorRegistry",
    "available",
    "check_finite",
    "check_operator",
    "check_img_size",
    "check_measurements_for",
    "check_ratio",
    "from_config",
    "has_exact_pinv",
    "has_linear_pinv",
    "image_shape_of",
    "make",
    "register",
    "unchecked_values",
    "values_checked",
    "without_size_and_seed",
]
