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

import torch
from torch import Tensor

from .._errors import GaugeError
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


def rk_lines(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    rtol: float,
    check: Callable[[int, float], None],
    steps: int | None = None,
) -> tuple[Tensor, float]:
    """Wilson lines over the flat intervals `t0 -> t1` (shape `(B,)`) to relative local
    accuracy `rtol` per unit of normalized time, or with `steps` equal steps (every step
    accepted: the fixed-step method whose order the tests fit). `check(n, σ)` is called
    before every step with the steps tried so far and the time reached (it raises when the
    budget is spent).
    Returns the lines `(B, ..., d, d)` and the summed local error estimate.

    The field is evaluated once per step, at all stage times of the batch; the stages live
    in one buffer (without autograd) so that each stage is one combination and one product.
    """
    nodes, rows, errors = _tableau(t0.dtype, t0.device)
    B, L = t0.shape[0], t1 - t0
    K0 = w(t0)
    check_field(K0, B)
    lshape = (-1, *([1] * (K0.dim() - 1)))
    # Intervals of one common length (one interval, its pieces, a regular grid) carry the
    # length as a number in the stage combinations instead of scaling every field value.
    common = float(L[0]) if B and bool((L[0] == L).all()) else None
    Ls = L.reshape(lshape)
    if common is None:
        K0 = K0 * Ls  # the first stage at Y = 1 is the (scaled) field: no product
    unit = 1.0 if common is None else abs(common)  # stage values times unit: per unit σ
    shape, flat = K0.shape, K0.numel()
    eye = torch.eye(shape[-1], dtype=K0.dtype, device=K0.device)
    Y = eye.expand(shape).reshape(1, flat)
    track = torch.is_grad_enabled() and K0.requires_grad
    tiny = torch.finfo(K0.dtype).tiny
    scale = float(K0.detach().abs().amax()) * unit if flat else 0.0
    # A first step from the field's size (8th order: error ~ (h |w|)^9, aimed at rtol).
    h = min(1.0, 0.5 * rtol ** (1.0 / 9.0) / max(scale, 1e-12)) if steps is None else 1 / steps
    sigma, total, taken = 0.0, 0.0, 0
    stages = len(rows) + 1
    Kbuf: Tensor | None = None
    Kviews: list[Tensor] = []  # the stages of Kbuf as (B, ..., d, d) views, made once
    while sigma < 1.0:
        check(taken, sigma)
        if steps is None:
            h = min(h, 1.0 - sigma)
        elif taken == steps:
            break
        else:
            sigma = taken / steps
        times = (t0 + sigma * L)[None, :] + (nodes * h)[:, None] * L[None, :]
        if len(nodes) * flat <= _ONE_CALL:
            # The field at every stage time of the step, in one call: (12, B, ..., d, d).
            F = w(times.reshape(-1))
            check_field(F, times.numel())
            F = F.reshape(len(nodes), *shape)
            F = (F if common is not None else F * Ls).unbind(0)
        else:  # large: one stage at a time, so that the field's values stay in cache

            def stage(i: int, times: Tensor = times) -> Tensor:
                A = w(times[i])
                check_field(A, B)
                return A if common is not None else A * Ls

            F = _Lazy(stage)
        if track:
            K = [K0.reshape(flat)]
        else:  # one buffer for all steps: fresh memory would cost page faults every step
            if Kbuf is None:
                Kbuf = torch.empty(stages, flat, dtype=K0.dtype, device=K0.device)
                Kviews = [k.view(shape) for k in Kbuf]
            Kviews[0].copy_(K0)
        for i, row in enumerate(rows):
            stack = torch.stack(K) if track else Kbuf[: i + 1]
            Ys = torch.addmm(Y, row, stack, alpha=h if common is None else h * common)
            Ys = Ys.reshape(shape)
            if i + 1 == len(rows):
                Ynew = Ys
            if track:
                K.append((F[i] @ Ys).reshape(flat))
            else:
                torch.matmul(F[i], Ys, out=Kviews[i + 1])
        Kall = torch.stack(K) if track else Kbuf
        with torch.no_grad():
            err = (errors @ Kall).reshape(2, *shape).abs().flatten(2).amax(2) * unit
            size = Ynew.detach().abs().flatten(1).amax(1).clamp_min(tiny)
            den = (err[0].square() + 0.01 * err[1].square()).sqrt().clamp_min(tiny)
            local = float((h * err[0].square() / den / size).amax())
        if not math.isfinite(local):
            raise GaugeError(
                f"wilson_line: the Runge-Kutta stages are not finite at σ = {sigma:.3g} of "
                "the interval (the field is not finite there, or the line overflows)"
            )
        taken += 1
        ratio = local / (rtol * h) if steps is None else 0.0
        if ratio <= 1.0:
            Y, sigma, total = Ynew.reshape(1, flat), sigma + h, total + local
            K0 = Kall[-1].reshape(shape).clone() if not track else K[-1].reshape(shape)
        if steps is not None:
            continue
        factor = 10.0 if ratio == 0.0 else min(10.0, max(0.2, 0.9 * ratio ** (-1.0 / 8.0)))
        h = h * (min(1.0, factor) if ratio > 1.0 else factor)
    return Y.reshape(shape), total
