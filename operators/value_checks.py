"""Switching off the operators' NaN/inf checks inside code that has checked its inputs once.

    with operators.unchecked_values():
        x = op.A_dagger(op.A(x))     # shapes and dtypes still checked; values not

Every :class:`operators.Operator` call checks that its input is finite,
so that a NaN from a user's data gets an error that names it. That check
reads one value of a device tensor back to the host: on a GPU each call
waits until every queued kernel has run, the Python side can no longer run
ahead of the GPU, and the code cannot be captured as a CUDA graph. An IDM
forward calls its operator dozens of times (twice per injector), a training
iteration hundreds of times; the model checks its measurements once on entry
and runs the rest inside this block (a non-finite value inside the network
then reaches the output, where ``idm reconstruct`` and the training loop
report it).

The switch is a :class:`contextvars.ContextVar`, like torch's grad mode:
it holds for the current thread (and asyncio task) only, and is restored on
exit, also on an error. Code that autograd re-runs in a backward pass on
another thread (the memory-saving backward recomputes the forward) enters
the block again itself.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

_CHECK_VALUES: ContextVar[bool] = ContextVar("operators_check_values", default=True)


def values_checked() -> bool:
    """Whether operator calls in this context check their inputs for NaN and inf (default: True)."""
    return _CHECK_VALUES.get()


@contextlib.contextmanager
def unchecked_values() -> Iterator[None]:
    """Within the block, operators check input shapes and dtypes but not values (see module docstring)."""
    token = _CHECK_VALUES.set(False)
    try:
        yield
    finally:
        _CHECK_VALUES.reset(token)
