"""Step-count control of Magnus lines: refinement pairs, predicted counts, one extrapolation.

The error at `m` steps is estimated from the gap to the result at `n < m` steps, divided by
`(m/n)^p - 1`: a first pair `n, 2n` in one batched call (its size predicted from the field,
`first_steps`), then the step count the estimate predicts, until the estimate is below `rtol`
for every interval. Gauss-Legendre Magnus methods are symmetric, so one Richardson step on
the last two results removes the leading error term.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .._errors import GaugeError
from . import _magnus_steps as fixed
from ._magnus import MagnusMethod
from ._magnus_numpy import numpy_small
from ._one_step import one_step_checked, one_step_estimate
from ._rk_backend import NUMPY_DTYPES
from ._rk_numpy import as_numpy

__all__ = [
    "FIRST_STEPS_CAP",
    "NUMPY_GAP",
    "extrapolate",
    "first_steps",
    "magnus_search",
    "relative_gap",
]

MatrixField = Callable[[Tensor], Tensor]


def relative_gap(a: Tensor, b: Tensor) -> float:
    """Largest over intervals of `max|a - b| / max|b|` (matrices are the last two axes);
    small CPU tensors without a graph in numpy (no kernels)."""
    if (
        b.device.type == "cpu"
        and b.dtype in NUMPY_DTYPES
        and b.numel() <= NUMPY_GAP
        and not (a.requires_grad or b.requires_grad)
    ):
        an, bn = as_numpy(a), as_numpy(b)
        if bn.size == 0:
            return 0.0
        dims = (-2, -1)
        gap = np.abs(an - bn).max(axis=dims)
        size = np.maximum(np.abs(bn).max(axis=dims), torch.finfo(b.dtype).tiny)
        return float((gap / size).max())
    num = (a - b).detach().abs().amax(dim=(-2, -1))
    den = b.detach().abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(b.dtype).tiny)
    return float((num / den).max()) if num.numel() else 0.0


#: `relative_gap` of tensors up to this many entries is computed in numpy
NUMPY_GAP = 2**14

#: the largest step count of the first refinement pair (see `first_steps`)
FIRST_STEPS_CAP = 16


def first_steps(A0: Tensor, lengths: Tensor, rtol: float) -> int:
    """The step count of the first pair: about where Magnus6's error `~ (h ν)^7` reaches
    `rtol`, from `ν` = the field's size `‖w(t0)‖_F / √d` times the interval's length, kept to
    `[1, FIRST_STEPS_CAP]` (the pair's estimate then predicts the final count). A pair near
    the final count saves a second batched call, which at small `d` costs more than the
    steps; the cap bounds the work a field much larger at `t0` than elsewhere can waste."""
    d = A0.shape[-1]
    if A0.shape[0] == 1 and A0.device.type == "cpu" and A0.dtype in NUMPY_DTYPES:
        # One interval on the CPU: numpy's norm, no kernels.
        norm = float(np.linalg.norm(as_numpy(A0).reshape(-1)))
        nu = norm / math.sqrt(d) * abs(lengths.item())
    else:
        with torch.no_grad():
            size = torch.linalg.vector_norm(A0.detach().flatten(1), dim=1) / math.sqrt(d)
            size = size * lengths.abs()
            nu = float(size.max()) if size.numel() else 0.0
    if not math.isfinite(nu):
        return 4
    return min(FIRST_STEPS_CAP, max(1, math.ceil(nu * rtol ** (-1.0 / 7.0) / 3.4)))


def magnus_search(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    method: MagnusMethod,
    rtol: float,
    n: int,
    max_steps: int,
    budget: Callable[[int, float], None],
    line_bytes: int = 0,
) -> tuple[Tensor, float]:
    """Step-count refinement of the Magnus lines (see `wilson_line`). Returns the
    extrapolated lines and the error estimate of the unextrapolated ones."""
    p, eps = method.order, torch.finfo(t0.dtype).eps / 2

    def exp_tol(m: int) -> float:
        # The exponentials' truncation stays far below what the steps' error may be.
        return max(eps, 1e-3 * rtol / m)

    prev = fine = None
    err, m = math.inf, n
    if n == 1 and method.embedded is not None:
        # Short intervals (one step predicted): one step and a bound of its gap to the
        # embedded lower-order step (without a second exponential), from which
        # `one_step_estimate` estimates the step's own error. Accepted when below rtol;
        # otherwise the step is the first of a refinement pair.
        budget(2, err)
        W, gap = one_step_checked(w, t1, t0, method, exp_tol(1), line_bytes)
        estimate = one_step_estimate(gap, p, method.embedded.order) + exp_tol(1)
        if estimate <= rtol:
            return W, estimate
        if math.isfinite(gap):
            budget(2, err)
            fine = fixed.fixed_steps(w, t1, t0, 2, method, exp_tol(2), line_bytes)
            prev, m = W, 2
            err = relative_gap(prev, fine) / (2**p - 1)
            if err <= rtol:
                return extrapolate(fine, prev, 2**p - 1), err
            if not math.isfinite(err):  # the search below diagnoses it from the start
                prev = fine = None
                err, m = math.inf, n
    while True:
        if fine is None:
            budget(3 * n, err)
            prev, fine = fixed.doubling_pair(w, t1, t0, n, method, exp_tol(2 * n), line_bytes)
            m, used = 2 * n, n
            err = relative_gap(prev, fine) / (2**p - 1)
        else:
            # Aim below the tolerance: estimates from few steps are often optimistic.
            grow = max(1.25, (err / (0.3 * rtol)) ** (1.0 / p))
            new_m = min(math.ceil(m * grow), max_steps)
            budget(new_m, err)
            new = fixed.fixed_steps(w, t1, t0, new_m, method, exp_tol(new_m), line_bytes)
            err = relative_gap(fine, new) / ((new_m / m) ** p - 1)
            prev, fine, n, m, used = fine, new, m, new_m, new_m
        if not math.isfinite(err):
            why = fixed.not_finite(w, t1, t0, used, method)
            if isinstance(why, GaugeError):
                raise why
            # The field is finite but the steps too long for it: start again, four times finer.
            n, prev, fine = 4 * m, None, None
            if 2 * n > max_steps:
                raise GaugeError(
                    f"wilson_line: the line is not finite with up to max_steps={max_steps} "
                    "steps although w(t) is: the line overflows or the field is too stiff"
                )
            continue
        if err <= rtol:
            break
        if m >= max_steps:
            raise GaugeError(
                f"wilson_line: the step budget max_steps={max_steps} is spent with an error "
                f"estimate of {err:.2e}, above rtol={rtol:.1e} (raise max_steps or rtol)"
            )
    # Gauss-Legendre Magnus methods are symmetric, so the global error is a series in even
    # powers of the step, led by h^p: one Richardson step removes that term. The reported
    # estimate stays the (larger) error estimate of the unextrapolated result.
    return extrapolate(fine, prev, (m / n) ** p - 1), err


def extrapolate(fine: Tensor, prev: Tensor, c: float) -> Tensor:
    """`fine + (fine - prev) / c`; one small line without a graph in numpy (the same
    elementwise operations: the same bits, no kernels)."""
    if numpy_small(fine, prev):
        f = as_numpy(fine)
        return torch.from_numpy(f + (f - as_numpy(prev)) / c)
    return fine + (fine - prev) / c
