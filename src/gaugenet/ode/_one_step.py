"""One Magnus step per interval, accepted on an estimate from its embedded lower-order exponent.

Where the field's size predicts one step per interval (short intervals, as in
`discretize(N)`), `wilson_line` takes one step and a bound of its gap to the embedded step
(no second exponential), and estimates the step's own error from that bound
(`one_step_estimate`) instead of solving a refinement pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._errors import GaugeError
from ._expm import expm
from ._magnus import MagnusMethod
from ._magnus_steps import chunk_size, node_times
from ._wilson_checks import check_field

__all__ = ["ONE_STEP_SAFETY", "one_step_checked", "one_step_estimate"]

MatrixField = Callable[[Tensor], Tensor]


def one_step_checked(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    method: MagnusMethod,
    exp_tol: float,
    line_bytes: int = 0,
) -> tuple[Tensor, float]:
    """One step of `method` per interval and a bound of its gap to the embedded exponent
    (`method.omega_and_gap`), relative to the largest entry of each line (the largest over
    lines).

    The embedded exponent is not exponentiated. With `D = Ω - Ω_e`, `e^Ω - e^{Ω_e} = Σ_{k≥1}
    Σ_{j<k} Ω^j D Ω_e^{k-1-j} / k!`, and entry `(i, l)` of `Ω^j D Ω_e^r` is at most
    `‖Ω‖_∞^j max|D| ‖Ω_e‖_1^r` (row sums on the left, column sums on the right), so every
    entry of the gap is at most `max|D| e^c`, `c` the largest row or column sum of `Ω` plus
    `d max|D|` (which bounds those of `D`). Divided by `max|W|` it bounds the relative
    entrywise gap; for a short step it is close to `max|D|`, where a Frobenius-norm bound
    would overstate the entries by up to a factor `d`."""
    check = method.embedded
    if check is None:
        raise GaugeError("wilson_line: the method has no embedded method to check against")
    size = chunk_size(t0.shape[0], (len(method.nodes) + len(check.nodes)) * line_bytes)
    parts, gaps = [], []
    for i in range(0, max(t0.shape[0], 1), size):
        a, b = t1[i : i + size], t0[i : i + size]
        # The field at both methods' nodes in one call.
        times = torch.cat([node_times(a, b, 1, method), node_times(a, b, 1, check)])
        values = w(times)
        check_field(values, times.shape[0])
        A, Ac = values.split([len(method.nodes) * a.shape[0], len(check.nodes) * a.shape[0]])
        A = A.reshape(a.shape[0], 1, len(method.nodes), *A.shape[1:])
        Ac = Ac.reshape(a.shape[0], 1, len(check.nodes), *Ac.shape[1:])
        hb = (a - b).reshape(-1, 1, *([1] * (A.dim() - 5)), 1, 1)
        omega, D = method.omega_and_gap(A.movedim(2, -3), Ac.movedim(2, -3), hb)
        W = expm(omega, exp_tol)
        with torch.no_grad():
            # (abs then amax: several times faster than vector_norm(ord=inf) on CPU)
            dims, d = (-2, -1), omega.shape[-1]
            first = D.detach().abs().amax(dim=dims)
            X = omega.detach().abs()
            c = torch.maximum(X.sum(-1).amax(-1), X.sum(-2).amax(-1)).add_(first, alpha=d)
            den = W.detach().abs().amax(dim=dims)
            bound = first * c.exp() / den.clamp_min(torch.finfo(W.dtype).tiny)
            gaps.append(bound.amax() if bound.numel() else bound.sum())
        parts.append(W[:, 0])
    W = parts[0] if len(parts) == 1 else torch.cat(parts)
    return W, float(torch.stack(gaps).amax())


#: safety factor of the one-step estimate `ONE_STEP_SAFETY · g^{(p+1)/(q+1)}` (see
#: `one_step_estimate`)
ONE_STEP_SAFETY = 10.0


def one_step_estimate(gap: float, order: int, embedded_order: int) -> float:
    """The error estimate of one step of order `order` from the bound `gap` of its gap to
    the embedded step of order `embedded_order`.

    In the asymptotic range both local errors are powers of one small number, the step's
    length times the field's size `x = h ν`: the embedded step's error is about `x^{q+1}`
    and the step's own about `x^{p+1}` (the constants of the leading terms, `1/720` and
    below for the commutator and quadrature terms of Gauss-Legendre Magnus methods, are
    below 1). The gap (mostly the embedded step's error) gives `x ≈ gap^{1/(q+1)}`, so the
    step's error is about `gap^{(p+1)/(q+1)}`; `ONE_STEP_SAFETY` covers constants the power
    does not. Outside the asymptotic range (`gap ≥ 1e-3`) the estimate is `gap` itself."""
    if not math.isfinite(gap) or gap >= 1e-3:
        return gap
    return min(gap, ONE_STEP_SAFETY * gap ** ((order + 1) / (embedded_order + 1)))
