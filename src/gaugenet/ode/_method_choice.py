"""The default Wilson-line method by dimension, step count and interval length."""

from __future__ import annotations

from ._magnus import Magnus6, MagnusMethod
from ._rk import RK8

__all__ = ["RK_MIN_DIM", "choose_method"]

#: `rtol` searches with Runge-Kutta from this dimension on (see `choose_method`)
RK_MIN_DIM = 64


def choose_method(d: int, steps: int | None, first: int) -> MagnusMethod | RK8:
    """The default method: `Magnus6` with fixed `steps`, below `d = RK_MIN_DIM`, and for
    intervals short enough for one step (`first == 1`, where one step and its embedded
    check cost about half of RK8's twelve stages); `RK8` otherwise, where a Magnus step's
    products (commutators, exponential, ordered product) cost more than the Runge-Kutta
    stages they save."""
    if steps is not None or d < RK_MIN_DIM or first == 1:
        return Magnus6()
    return RK8()
