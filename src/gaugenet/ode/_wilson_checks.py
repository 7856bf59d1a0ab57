"""Checks and budgets of `wilson_line`: field values, reachable tolerances, bounded memory.

A Wilson line is never returned non-finite or less accurate than asked without a
`GaugeError` saying why: a field that is not finite where it is evaluated, a tolerance the
dtype cannot reach, a step budget spent before the tolerance was reached (with the error
estimate reached), or a step count whose batched temporaries would exceed the memory cap.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._errors import GaugeError

__all__ = ["check_field", "check_memory", "check_rtol", "min_rtol", "nonfinite_field"]

#: default cap on the bytes of one batched call's temporaries (2 GiB)
DEFAULT_MAX_BYTES = 2**31
#: whole-batch `d × d` tensors alive at once in one Magnus call (node values, moments,
#: commutators, the exponential's powers and blocks), counted per step and line
_TEMPORARIES = 16


def min_rtol(dtype: torch.dtype) -> float:
    """The smallest accepted `rtol`: 8 units of roundoff of `dtype`, the level below which
    the rounding of a few dozen products decides the error estimate."""
    return 8.0 * torch.finfo(dtype).eps


def check_rtol(rtol: float, dtype: torch.dtype) -> float:
    """`rtol` as a float, if it is a positive, finite number the dtype can reach."""
    try:
        value = float(rtol)
    except (TypeError, ValueError):
        raise GaugeError(f"wilson_line: rtol must be a number, got {rtol!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise GaugeError(f"wilson_line: rtol must be positive and finite, got {rtol!r}")
    floor = min_rtol(dtype)
    if value < floor:
        raise GaugeError(
            f"wilson_line: rtol={value:.1e} is below what {dtype} can reach "
            f"(at least {floor:.1e}, 8 units of roundoff)"
        )
    return value


def check_field(A: Tensor, m: int) -> None:
    """`A = w(t)` for `m` times must be `(m, ..., d, d)`, floating point."""
    if not isinstance(A, Tensor):
        raise GaugeError(f"wilson_line: w(t) must return a tensor, got {type(A).__name__}")
    if A.dim() < 3 or A.shape[0] != m or A.shape[-1] != A.shape[-2]:
        raise GaugeError(
            f"wilson_line: w(t) for {m} times must have shape ({m}, ..., d, d), "
            f"got {tuple(A.shape)}"
        )
    if not A.is_floating_point():
        raise GaugeError(f"wilson_line: w(t) must be floating point, got {A.dtype}")


def nonfinite_field(A: Tensor, times: Tensor) -> GaugeError | None:
    """The error to raise when some `A[k] = w(times[k])` is not finite, else `None`."""
    with torch.no_grad():
        bad = ~torch.isfinite(A.detach().reshape(A.shape[0], -1)).all(dim=1)
        if not bool(bad.any()):
            return None
        where = times.detach().reshape(-1)[bad][:3].tolist()
    listed = ", ".join(f"{t:.6g}" for t in where)
    return GaugeError(f"wilson_line: w(t) is not finite at t = {listed}")


def check_memory(steps: int, lines: int, d: int, itemsize: int, max_bytes: int, why: str) -> None:
    """Raise when `steps` steps for `lines` lines of `d × d` would need more than
    `max_bytes` of temporaries (about `16 · steps · lines · d² · itemsize`)."""
    need = _TEMPORARIES * steps * lines * d * d * itemsize
    if need > max_bytes:
        raise GaugeError(
            f"wilson_line: {steps} steps for {lines} line(s) of size {d} need about "
            f"{need / 2**30:.2f} GiB of temporaries, over the cap of "
            f"{max_bytes / 2**30:.2f} GiB (max_bytes); {why}"
        )
