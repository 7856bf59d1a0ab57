"""A batched adaptive Runge-Kutta propagator for Wilson lines: Dormand-Prince 8(5,3).

For large `d` a Magnus step's products (commutators, exponential, ordered product: about
ten per step) cost more than an eighth-order Runge-Kutta stage's single product `w(t) Y`,
and Dormand and Prince's DOP853 needs far fewer stages than Magnus6 needs products at the
same accuracy. Here every interval of the batch is integrated at once in a normalized time
`σ ∈ [0, 1]` (`t = t0 + σ (t1 - t0)`), so all intervals share the step sequence and each
stage is one batched product; the step is controlled by the largest error of the batch.

The tableau is Hairer's (as published with DOP853), taken from scipy. The local error is
Hairer's combination of the fifth- and third-order estimates, measured relative to the
largest entry of each line; a step is accepted when it is below `rtol · Δσ` (error per unit
step), so the sum of the accepted local errors, reported as the error estimate, stays below
`rtol`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from torch import Tensor

from .._errors import GaugeError
from ._rk_backend import NUMPY_DTYPES, numpy_stages
from ._rk_numpy import NumpyStage, as_numpy
from ._rk_stages import BufferedStage, TrackedStage
from ._wilson_checks import check_field

__all__ = ["RK8", "rk_lines"]

#: the field is evaluated at all stage times of a step in one call up to this many entries
_ONE_CALL = 2**20


class _Lazy:
    """`F[i]` computed on access (the stage values of a large field, one at a time)."""

    def __init__(self, fn: Callable[[int], Tensor]):
        self.fn = fn

    def __getitem__(self, i: int) -> Tensor:
        return self.fn(i)


MatrixField = Callable[[Tensor], Tensor]


class RK8:
    """Marker for the batched DOP853 propagator (order 8; `wilson_line(..., method=RK8())`).

    Unlike the Magnus methods it keeps no group structure exactly: `W_{t0:t1} W_{t1:t0} = 1`
    and `det W = exp ∫ tr w` hold to the tolerance, not to rounding."""

    order = 8
    stages = 12  # products per step (the last stage is the next step's first)


@cache
def _tableau(
    dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """Stage nodes `c_1 … c_12` (the last is 1: the next step's first stage), the rows of
    `A` with the weights `b` as a 13th row, and the error weights `(E5; E3)` as `(2, 13)`."""
    from scipy.integrate._ivp import dop853_coefficients as c

    s = c.N_STAGES
    nodes = torch.tensor(c.C[1 : s + 1], dtype=dtype, device=device)
    # Each row as a `(1, i)` matrix: a stage's combination is one `addmm`.
    rows = [torch.tensor(c.A[i, :i], dtype=dtype, device=device)[None] for i in range(1, s)]
    rows.append(torch.tensor(c.B, dtype=dtype, device=device)[None])
    errors = torch.tensor(list(zip(c.E5, c.E3)), dtype=dtype, device=device).T.contiguous()
    return nodes, rows, errors


def _field_size(K0: Tensor) -> float:
    """`max(2 max|K0|, max over lines of ‖K0‖_F / √d)` for `K0` `(B, ..., d, d)`."""
    d = K0.shape[-1]
    if K0.numel() == d * d and K0.device.type == "cpu" and K0.dtype in NUMPY_DTYPES:
        # One line on the CPU: numpy's reductions, no kernels.
        a = as_numpy(K0).reshape(-1)
        return max(2.0 * float(np.abs(a).max()), float(np.linalg.norm(a)) / math.sqrt(d))
    rms = torch.linalg.vector_norm(K0.reshape(-1, d * d), dim=1).amax() / math.sqrt(d)
    return max(2.0 * float(torch.linalg.vector_norm(K0, math.inf)), float(rms))


@cache
def _nodes() -> np.ndarray:
    """The stage nodes `c_1 … c_12` in float64, as numbers for the stage times of one
    interval."""
    from scipy.integrate._ivp import dop853_coefficients as c

    return np.array(c.C[1 : c.N_STAGES + 1], dtype=np.float64)


def _largest_error(terms: Tensor, tiny: float) -> float:
    """Hairer's local error `|E5 K|² / sqrt(|E5 K|² + 0.01 |E3 K|²)` relative to the line's
    largest entry, the largest over lines, from `terms = (|E5 K|, |E3 K|, max|Y|)` of shape
    `(3, lines)` (in Python for few lines: one host transfer instead of a chain of kernels)."""
    if terms.shape[1] == 0:
        return 0.0
    if terms.shape[1] <= 16:
        values = [
            e5 * e5 / max(math.sqrt(e5 * e5 + 0.01 * e3 * e3), tiny) / max(s, tiny)
            for e5, e3, s in zip(*terms.tolist())
        ]
        # (Python's max passes over a NaN that is not first: a non-finite line is reported.)
        return max(values) if all(map(math.isfinite, values)) else math.nan
    e5, e3, size = terms.unbind(0)
    s5 = e5 * e5
    den = torch.addcmul(s5, e3, e3, value=0.01).sqrt_().clamp_min_(tiny)
    return float(s5.div_(den).div_(size.clamp_min(tiny)).amax())


def rk_lines(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    rtol: float,
    check: Callable[[int, float], None],
    steps: int | None = None,
    K0: Tensor | None = None,
) -> tuple[Tensor, float]:
    """Wilson lines over the flat intervals `t0 -> t1` (shape `(B,)`) to relative local
    accuracy `rtol` per unit of normalized time, or with `steps` equal steps (every step
    accepted: the fixed-step method whose order the tests fit). `check(n, σ)` is called
    before every step with the steps tried so far and the time reached (it raises when the
    budget is spent). `K0`: `w(t0)` when the caller has it already.
    Returns the lines `(B, ..., d, d)` and the summed local error estimate.

    The field is evaluated once per step, at all stage times of the batch. Without autograd
    the stages, the stage inputs and the lines live in buffers made once (`BufferedStage`):
    each stage is one combination and one product written in place, and an accepted step
    swaps two buffers instead of copying; a single line on the CPU runs them on numpy's BLAS
    where that is measured faster (`NumpyStage`, `_rk_backend`).
    """
    nodes, rows, errors = _tableau(t0.dtype, t0.device)
    B, L = t0.shape[0], t1 - t0
    if K0 is None:
        K0 = w(t0)
        check_field(K0, B)
    lshape = (-1, *([1] * (K0.dim() - 1)))
    # Intervals of one common length (one interval, its pieces, a regular grid) carry the
    # length as a number in the stage combinations instead of scaling every field value.
    first = L.item() if B == 1 else float(L[0]) if B else None
    common = first if B == 1 or (B and bool((L[0] == L).all())) else None
    if common is None:
        Ls = L.reshape(lshape)
        K0 = K0 * Ls  # the first stage at Y = 1 is the (scaled) field: no product
    unit = 1.0 if common is None else abs(common)  # stage values times unit: per unit σ
    shape = K0.shape
    track = torch.is_grad_enabled() and K0.requires_grad
    tiny = torch.finfo(K0.dtype).tiny
    # A first step from the field's size (8th order: error ~ (h |w|)^9, aimed at rtol): the
    # larger of twice its largest entry (the size this step always took) and its
    # root-mean-square row norm `‖w‖_F / √d`, which like the entry is below its operator
    # norm; the entry alone shrinks like 1/√d against the norm of a dense field, and its
    # first steps were rejected at d = 256.
    scale = _field_size(K0.detach()) * unit if K0.numel() else 0.0
    h = min(1.0, 1.15 * rtol ** (1.0 / 9.0) / max(scale, 1e-12)) if steps is None else 1 / steps
    if track:
        step = TrackedStage(K0, rows)
    else:
        step = NumpyStage(K0, rows, errors) if numpy_stages(K0) else BufferedStage(K0, rows)
    sigma, total, taken = 0.0, 0.0, 0
    one = B == 1 and t0.device.type == "cpu" and t0.dtype in (torch.float32, torch.float64)
    start, length = (t0.item(), first) if one else (None, None)
    cs = _nodes()
    one_call = len(nodes) * K0.numel() <= _ONE_CALL
    np_dtype = np.float32 if t0.dtype == torch.float32 else np.float64
    while sigma < 1.0:
        check(taken, sigma)
        if steps is None:
            # The rest of the interval in equal steps of at most h: no short last step.
            rest = 1.0 - sigma
            h = rest / max(1, math.ceil(rest / h - 1e-9))
        elif taken == steps:
            break
        else:
            sigma = taken / steps
        if start is not None:  # one interval on the CPU: its stage times without a kernel
            flat = torch.from_numpy(((cs * h + sigma) * length + start).astype(np_dtype))
        else:
            flat = torch.addcmul(t0, (nodes * h).add_(sigma)[:, None], L).reshape(-1)
        if one_call:
            # The field at every stage time of the step, in one call: (12 B, ..., d, d).
            F = w(flat)
            check_field(F, flat.shape[0])
            F = step.unbind(F if common is not None else F.reshape(-1, *shape) * Ls)
        else:  # large: one stage at a time, so that the field's values stay in cache

            def stage(i: int, flat: Tensor = flat) -> Tensor:
                A = w(flat[i * B : (i + 1) * B])
                check_field(A, B)
                return A if common is not None else A * Ls

            F = _Lazy(stage)
        step.stages(F, h if common is None else h * common)
        # Hairer's error: per line, |E5 K|² / sqrt(|E5 K|² + 0.01 |E3 K|²) relative to the
        # largest entry of the new line (one host sync per step; the terms carry no graph).
        local = h * unit * _largest_error(step.error_terms(errors), tiny)
        if not math.isfinite(local):
            raise GaugeError(
                f"wilson_line: the Runge-Kutta stages are not finite at σ = {sigma:.3g} of "
                "the interval (the field is not finite there, or the line overflows)"
            )
        taken += 1
        ratio = local / (rtol * h) if steps is None else 0.0
        if ratio <= 1.0:
            step.accept()
            sigma, total = sigma + h, total + local
        if steps is not None:
            continue
        factor = 10.0 if ratio == 0.0 else min(10.0, max(0.2, 0.9 * ratio ** (-1.0 / 8.0)))
        h = h * (min(1.0, factor) if ratio > 1.0 else factor)
    return step.line(), total
