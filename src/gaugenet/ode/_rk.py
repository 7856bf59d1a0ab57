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

__all__ = ["RK8", "rk_lines"]

MatrixField = Callable[[Tensor], Tensor]


class RK8:
    """Marker for the batched DOP853 propagator (order 8; `wilson_line(..., method=RK8())`).

    Unlike the Magnus methods it keeps no group structure exactly: `W_{t0:t1} W_{t1:t0} = 1`
    and `det W = exp ∫ tr w` hold to the tolerance, not to rounding."""

    order = 8
    stages = 12  # products per step (the last stage is the next step's first)


@cache
def _tableau(dtype: torch.dtype) -> tuple[Tensor, list[list[float]], list[float], Tensor, Tensor]:
    from scipy.integrate._ivp import dop853_coefficients as c

    s = c.N_STAGES
    nodes = torch.tensor(c.C[: s + 1], dtype=dtype)
    rows = [[float(a) for a in c.A[i, :i]] for i in range(s)]
    b = [float(x) for x in c.B]
    return nodes, rows, b, torch.tensor(c.E5, dtype=dtype), torch.tensor(c.E3, dtype=dtype)


def rk_lines(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    rtol: float,
    check: Callable[[int, float], None],
) -> tuple[Tensor, float]:
    """Wilson lines over the flat intervals `t0 -> t1` (shape `(B,)`) to relative local
    accuracy `rtol` per unit of normalized time. `check(n, σ)` is called before every step
    with the steps tried so far and the time reached (it raises when the budget is spent).
    Returns the lines `(B, ..., d, d)` and the summed local error estimate."""
    nodes, rows, b, e5, e3 = _tableau(t0.dtype)
    nodes = nodes.to(t0.device)
    L = t1 - t0

    def field(sigma: Tensor) -> Tensor:
        """`(t1 - t0) w(t0 + σ (t1 - t0))` with the interval length in front."""
        A = w(t0 + sigma * L)
        return A * L.reshape(-1, *([1] * (A.dim() - 1)))

    # The first stage at Y = 1 is the field itself: no product.
    K0 = field(torch.zeros_like(t0))
    eye = torch.eye(K0.shape[-1], dtype=K0.dtype, device=K0.device)
    Y = eye.expand_as(K0)
    shape = K0.shape
    flat = K0.numel()
    scale = float(K0.detach().abs().amax()) if flat else 0.0
    # A first step from the field's size (8th order: error ~ (h |w|)^9, aimed at rtol).
    h = min(1.0, 0.5 * rtol ** (1.0 / 9.0) / max(scale, 1e-12))
    sigma, total, taken = 0.0, 0.0, 0
    while sigma < 1.0:
        check(taken, sigma)
        h = min(h, 1.0 - sigma)
        K = [K0]
        for i in range(1, len(rows)):
            coef = torch.tensor(rows[i], dtype=Y.dtype, device=Y.device) * h
            Ys = torch.addmm(
                Y.reshape(1, flat), coef[None], torch.stack(K).reshape(i, flat)
            ).reshape(shape)
            K.append(field(torch.full_like(t0, sigma) + nodes[i] * h) @ Ys)
        Kt = torch.stack(K).reshape(len(K), flat)
        bt = torch.tensor(b, dtype=Y.dtype, device=Y.device) * h
        Ynew = torch.addmm(Y.reshape(1, flat), bt[None], Kt).reshape(shape)
        K12 = field(torch.full_like(t0, sigma + h)) @ Ynew
        Kall = torch.cat([Kt, K12.reshape(1, flat)])
        with torch.no_grad():
            err5 = (e5 @ Kall).reshape(shape).abs().flatten(1).amax(1)
            err3 = (e3 @ Kall).reshape(shape).abs().flatten(1).amax(1)
            size = Ynew.abs().flatten(1).amax(1).clamp_min(torch.finfo(Y.dtype).tiny)
            den = (err5.square() + 0.01 * err3.square()).sqrt().clamp_min(torch.finfo(Y.dtype).tiny)
            local = float((h * err5.square() / den / size).amax())
        if not math.isfinite(local):
            raise GaugeError(
                f"wilson_line: the Runge-Kutta stages are not finite at σ = {sigma:.3g} "
                "(the field or the line overflows)"
            )
        taken += 1
        ratio = local / (rtol * h)
        if ratio <= 1.0:
            Y, K0, sigma, total = Ynew, K12, sigma + h, total + local
        factor = 10.0 if ratio == 0.0 else min(10.0, max(0.2, 0.9 * ratio ** (-1.0 / 8.0)))
        h = h * (min(1.0, factor) if ratio > 1.0 else factor)
    return Y, total
