"""Wilson lines `W_{t1:t0} = T exp ∫_{t0}^{t1} w(t) dt` (paper eq. 23): the entry point.

`wilson_line` validates its input, picks the method (`choose_method`) and hands the batch of
intervals to a fixed-step Magnus solve (`_magnus_steps`), the Magnus step-count control
(`_magnus_search`, with the one-step check of `_one_step`) or the batched RK8 propagator
(`_rk_wilson`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._errors import GaugeError
from ._magnus import Magnus4, Magnus6, MagnusMethod
from ._magnus_search import first_steps, magnus_search, relative_gap
from ._magnus_steps import check_finite, doubling_pair, fixed_steps
from ._method_choice import choose_method
from ._one_step import one_step_estimate
from ._products import ordered_product, prefix_products
from ._rk import RK8
from ._rk_wilson import rk_wilson
from ._wilson_checks import DEFAULT_MAX_BYTES, check_field, check_memory, check_rtol, min_rtol

__all__ = [
    "Magnus4",
    "Magnus6",
    "MagnusMethod",
    "choose_method",
    "one_step_estimate",
    "ordered_product",
    "prefix_products",
    "wilson_line",
]

MatrixField = Callable[[Tensor], Tensor]


def wilson_line(
    w: MatrixField,
    t1: Tensor | float,
    t0: Tensor | float,
    *,
    steps: int | None = None,
    rtol: float | None = None,
    method: MagnusMethod | RK8 | None = None,
    return_error: bool = False,
    max_steps: int = 2**15,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Tensor | tuple[Tensor, float]:
    r"""The Wilson line `W_{t1:t0}` of eq. (23), batched over intervals.

    It solves `∂_{t1} W_{t1:t0} = w(t1) W_{t1:t0}`, `W_{t0:t0} = 1`; for `t1 < t0` it is the
    reverse-ordered exponential, equal to `W_{t0:t1}⁻¹`.

    **Arguments:**

    - `w`: callable mapping a 1-D tensor of `m` times to `(m, ..., d, d)`.
    - `t1`, `t0`: end and start times, numbers or broadcastable tensors of any shape `S`.
    - `steps`: Magnus steps per interval (all intervals get the same number). With `rtol`
      unset, exactly `steps` steps are taken.
    - `rtol`: relative accuracy to reach (positive, finite, at least 8 units of roundoff).
      Magnus methods: the error at `m` steps is estimated from the gap to the result at
      `n < m` steps, divided by `(m/n)^p - 1` (a first pair `n, 2n` in one batched call,
      then the step count the estimate predicts); steps are added until the estimate is
      below `rtol` for every interval. The last two results are then combined by one
      Richardson extrapolation (the methods are symmetric, so the error expands in even
      powers of the step), which only makes the returned line more accurate than the
      estimate. When the field's size predicts one step per interval and the method has an
      `embedded` one (`Magnus6`: a fourth-order exponent sharing its commutator), the single
      step is accepted without a pair if the estimate of its error from a bound of its gap
      to the embedded step (`one_step_estimate`) is below `rtol`; that estimate is
      returned. `RK8`: adaptive steps shared by
      the batch, the summed local error estimates below `rtol`. Default, when neither is
      given: `1e-12` in float64, `1e-6` otherwise.
    - `method`: a `MagnusMethod` or `RK8()`. Default (`choose_method`): `Magnus6()` with
      `steps`, for `d < 64`, and for intervals short enough for one step; `RK8()`
      otherwise, where the products of a Magnus step cost more than the Runge-Kutta stages
      they save (RK8 keeps the group laws and `det` only to the tolerance).
    - `return_error`: also return the error estimate (needs a second result, even with
      `steps`: the first is then taken at `steps`).
    - `max_steps`: the cap on steps per interval; a tolerance not reached within it raises
      `GaugeError` with the error estimate reached.
    - `max_bytes`: the cap on the temporaries of one batched call (about `16 · steps ·
      intervals · d² · itemsize` bytes); a step count that would exceed it raises.

    **Returns:** `W` of shape `S + (..., d, d)`; with `return_error`, `(W, error_estimate)`.

    **Raises:** `GaugeError` for non-finite times, a field that is not finite or not of shape
    `(m, ..., d, d)`, an invalid `steps` or `rtol`, a line that overflows, and the budgets.
    """
    ref = next((t for t in (t1, t0) if isinstance(t, Tensor)), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float64
    device = ref.device if ref is not None else None
    t1 = torch.as_tensor(t1, dtype=dtype, device=device)
    t0 = torch.as_tensor(t0, dtype=dtype, device=device)
    if t1.shape != t0.shape:
        t1, t0 = torch.broadcast_tensors(t1, t0)
    shape = t1.shape
    t1f, t0f = t1.reshape(-1), t0.reshape(-1)
    if t1f.numel() <= 16 and t1f.device.type == "cpu":  # (few numbers: no kernels)
        finite = all(map(math.isfinite, t1f.tolist() + t0f.tolist()))
    else:
        finite = bool(torch.isfinite(t1f).all() and torch.isfinite(t0f).all())
    if not finite:
        raise GaugeError("wilson_line: interval end points must be finite")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise GaugeError(f"wilson_line: steps must be a positive integer, got {steps!r}")
    if rtol is not None:
        rtol = check_rtol(rtol, dtype)
    elif steps is None:
        rtol = 1e-12 if dtype == torch.float64 else 1e-6
    B = t1f.shape[0]
    if B == 0:  # no intervals: the shape of the (empty) result from w at no times
        magnus = method if isinstance(method, MagnusMethod) else Magnus6()
        W = fixed_steps(w, t1f, t0f, steps or 1, magnus)
        return (
            (W.reshape(*shape, *W.shape[1:]), 0.0)
            if return_error
            else W.reshape(*shape, *W.shape[1:])
        )
    A0 = w(t0f)
    check_field(A0, B)  # (finiteness: from the lines' reductions, diagnosed when they fail)
    d = A0.shape[-1]
    lines = B * math.prod(A0.shape[1:-2])
    itemsize = A0.element_size()
    line_bytes = A0.numel() // B * itemsize  # the field at one time
    rtol_eff = rtol if rtol is not None else min_rtol(dtype)
    first = steps if steps is not None else first_steps(A0, t1f - t0f, rtol_eff)
    if steps is None:  # the pair's finer half stays within the step budget
        first = min(first, max(1, max_steps // 2))
    if method is None:
        method = choose_method(d, steps, first)

    def budget(n: int, err: float) -> None:
        reached = f"error estimate reached {err:.2e}" if math.isfinite(err) else "no estimate yet"
        check_memory(n, lines, d, itemsize, max_bytes, reached)

    if isinstance(method, RK8):
        check_memory(1, lines, d, itemsize, max_bytes, "RK8 keeps 13 stages per line")
        fixed = steps if rtol is None else None
        W, err = rk_wilson(w, t1f, t0f, A0, rtol, fixed, max_steps)
        W = W.reshape(*shape, *W.shape[1:])
        return (W, err) if return_error else W

    if rtol is None and not return_error:
        budget(steps, math.inf)
        W = fixed_steps(w, t1f, t0f, steps, method, None, line_bytes)
        check_finite(float(W.detach().abs().amax()), w, t1f, t0f, steps, method)
        return W.reshape(*shape, *W.shape[1:])

    n = first
    # Intermediate results only need a graph when w carries one (training).
    track = torch.is_grad_enabled() and A0.requires_grad

    def solve(wf: MatrixField) -> tuple[Tensor, float]:
        if rtol is None:  # steps with return_error: one pair, its estimate
            budget(3 * steps, math.inf)
            prev, fine = doubling_pair(wf, t1f, t0f, steps, method, None, line_bytes)
            err = relative_gap(prev, fine) / (2**method.order - 1)
            check_finite(err, wf, t1f, t0f, steps, method)
            return fine + (fine - prev) / (2**method.order - 1), err
        return magnus_search(wf, t1f, t0f, method, rtol, n, max_steps, budget, line_bytes)

    if track:
        fine, err = solve(w)
    else:
        # No graph: the search's kernels run in inference mode, whose dispatch is cheaper
        # (at small d a kernel's dispatch costs more than its arithmetic); w runs outside
        # it, so that what it returns or caches stays an ordinary tensor, and so does the
        # returned line (a copy).
        with torch.inference_mode():
            fine, err = solve(outside_inference(w))
        fine = fine.clone()
    W = fine.reshape(*shape, *fine.shape[1:])
    return (W, err) if return_error else W


def outside_inference(w: MatrixField) -> MatrixField:
    """`w` called with inference mode off and gradients off (its values need no graph)."""

    def field(t: Tensor) -> Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return w(t)

    return field
