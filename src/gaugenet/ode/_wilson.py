"""Wilson lines `W_{t1:t0} = T exp ∫_{t0}^{t1} w(t) dt` (paper eq. 23) by Magnus integrators.

One Magnus step replaces the time-ordered exponential over `[t, t + h]` by `exp(Ω(h))`, where
`Ω` is built from `w` at Gauss-Legendre nodes and a few commutators. The intervals are taken
in cache-sized chunks; every step of a chunk is exponentiated in one batched call (`expm`)
and the ordered product is taken as a balanced tree, so the work is a handful of batched
kernels per chunk. Short intervals get one step, checked against an embedded lower-order
exponent, instead of a refinement pair. Gauss-Legendre
Magnus methods are time-symmetric, so a step with `h < 0` is exactly the inverse of the step
with `-h`: `W_{t0:t1} = W_{t1:t0}⁻¹` holds to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._errors import GaugeError
from ._expm import expm
from ._rk import RK8, rk_lines
from ._wilson_checks import (
    DEFAULT_MAX_BYTES,
    check_field,
    check_memory,
    check_rtol,
    min_rtol,
    nonfinite_field,
)

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


class MagnusMethod:
    """A Magnus integrator: `order`, Gauss-Legendre `nodes` in `[0, 1]`, and `omega`.

    `embedded`, when set, is a lower-order method whose lines, taken beside this method's
    in the same pass, estimate the error (see `wilson_line`)."""

    order: int
    nodes: tuple[float, ...]
    embedded: MagnusMethod | None = None

    def omega(self, A: Tensor, h: Tensor) -> Tensor:
        """The step exponent `Ω` from `A[..., j, :, :] = w(t + nodes[j] h)`, of shape
        `(..., s, d, d)` for `s` nodes; `h` broadcasts against `(..., d, d)` as `(..., 1, 1)`.
        Returns `(..., d, d)`."""
        raise NotImplementedError

    def omega_and_gap(self, A: Tensor, Ae: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """`Ω` (as `omega`) and its gap `Ω - Ω_e` to an embedded exponent of the order of
        `embedded`, from the node values `A` and `Ae` (at `embedded.nodes`). By default
        `Ω_e` is `embedded.omega(Ae, h)`; a method may share its own products with it."""
        if self.embedded is None:
            raise GaugeError("wilson_line: the method has no embedded method to check against")
        omega = self.omega(A, h)
        return omega, omega - self.embedded.omega(Ae, h)


def _result_shape(A: Tensor, h: Tensor) -> tuple[int, ...]:
    """The broadcast of `A.shape` without its node axis with `h.shape` (plain Python:
    `torch.broadcast_shapes` costs more than a small step's arithmetic)."""
    a = tuple(A.shape[:-3]) + tuple(A.shape[-2:])
    b = tuple(h.shape)
    if len(b) > len(a):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            raise GaugeError(f"wilson_line: step shape {tuple(h.shape)} does not fit {a}")
        out.append(y if x == 1 else x)
    return tuple(out)


def _moments(A: Tensor, h: Tensor, M: Sequence[Sequence[float]]) -> tuple[Tensor, ...]:
    """`h Σ_j M[k][j] A[..., j, :, :]` for each row `k` of `M`, flattened to `(N, d, d)`
    batches; `h` broadcasts as `(..., 1, 1)`. Each moment is one new tensor, accumulated in
    place (few whole-batch temporaries)."""
    d = A.shape[-1]
    nodes = A.unbind(-3)
    out = []
    for row in M:
        terms = [(c, a) for c, a in zip(row, nodes) if c != 0.0]
        c0, a0 = terms[0]
        acc = a0 * (c0 * h)
        for c, a in terms[1:]:
            acc.addcmul_(a, h, value=c)
        out.append(acc.reshape(-1, d, d))
    return tuple(out)


class Magnus4(MagnusMethod):
    """Fourth-order Magnus method at the two Gauss-Legendre nodes `1/2 ∓ √3/6`:
    `Ω = h (a₁ + a₂)/2 + (√3/12) h² [a₂, a₁]`."""

    order = 4
    nodes = (0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6)

    def omega(self, A: Tensor, h: Tensor) -> Tensor:
        shape = _result_shape(A, h)
        # The mean and the scaled difference of the two node values.
        r = math.sqrt(3) / 12
        mean, diff = _moments(A, h, ((0.5, 0.5), (-r, r)))
        # (√3/12) h² [a₂, a₁] = [(√3/12) h (a₂ - a₁), h (a₁ + a₂)/2] = [diff, mean].
        out = torch.bmm(diff, mean).baddbmm_(mean, diff, alpha=-1.0).add_(mean)
        return out.reshape(shape)


class Magnus6(MagnusMethod):
    """Sixth-order Magnus method at the three Gauss-Legendre nodes `1/2 - √15/10, 1/2,
    1/2 + √15/10`, with the commutator grouping that needs three commutators per step.

    Its embedded exponent (`omega_and_gap`) is of order 4: the two-node Gauss-Legendre
    integral of `w` (at `Magnus4`'s nodes: two more field values) minus `[α₁, α₂]/12`, the
    commutator this method computes anyway, so the gap costs no product. The gap holds
    Magnus6's fifth-order commutator terms and the difference of the two quadratures, which
    sees the field's variation even where every commutator vanishes.
    """

    order = 6
    embedded = Magnus4()
    nodes = (0.5 - math.sqrt(15) / 10, 0.5, 0.5 + math.sqrt(15) / 10)
    # Legendre moments of w about the step midpoint (before the factor h).
    _MOMENTS = (
        (0.0, 1.0, 0.0),
        (-math.sqrt(15) / 3, 0.0, math.sqrt(15) / 3),
        (10.0 / 3.0, -20.0 / 3.0, 10.0 / 3.0),
    )

    def omega(self, A: Tensor, h: Tensor) -> Tensor:
        return self._omega(A, h, None)[0]

    def omega_and_gap(self, A: Tensor, Ae: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        omega, other = self._omega(A, h, Ae)
        return omega, omega - other

    def _omega(self, A: Tensor, h: Tensor, Ae: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """`Ω` and, with `Ae` (two-node values), the embedded exponent."""
        shape = _result_shape(A, h)
        al1, al2, al3 = _moments(A, h, self._MOMENTS)
        # Fused products accumulate into fresh results in place (baddbmm_ computes
        # beta*x + alpha*a@b without copying x); no backward pass reads what they overwrite.
        c1 = torch.bmm(al1, al2).baddbmm_(al2, al1, alpha=-1.0)  # [al1, al2]
        other = None
        if Ae is not None:
            (mean,) = _moments(Ae, h, ((0.5, 0.5),))
            other = mean.sub_(c1, alpha=1.0 / 12).reshape(shape)
        y = torch.add(c1, al3, alpha=2.0)
        c2 = torch.bmm(al1, y).baddbmm_(y, al1, beta=-1.0 / 60, alpha=1.0 / 60)  # -[al1, y]/60
        u = c1.sub_(al1, alpha=20.0).sub_(al3)  # [al1, al2] - 20 al1 - al3
        v = c2.add_(al2)
        out = torch.bmm(u, v).baddbmm_(v, u, alpha=-1.0)  # [u, v]
        out = out.mul_(1.0 / 240).add_(al1).add_(al3, alpha=1.0 / 12)
        return out.reshape(shape), other


def ordered_product(mats: Tensor) -> Tensor:
    """`mats[..., s-1, :, :] @ ... @ mats[..., 0, :, :]` (later factors on the left), as a
    balanced tree of batched matmuls. `mats`: `(..., s, d, d)` with `s >= 1` → `(..., d, d)`.

    At a level with an odd count the last (latest) factor is set aside; the factors set aside
    are later than everything that remains, so they multiply the result from the left."""
    left = None
    while mats.shape[-3] > 1:
        if mats.shape[-3] % 2:
            last = mats[..., -1, :, :]
            left = last if left is None else left @ last
            mats = mats[..., :-1, :, :]
        mats = mats[..., 1::2, :, :] @ mats[..., 0::2, :, :]
    out = mats[..., 0, :, :]
    return out if left is None else left @ out


def prefix_products(F: Tensor) -> Tensor:
    """`P[0] = 1`, `P[k] = F[k-1] ⋯ F[0]`: a Hillis-Steele scan in log-depth batched matmuls."""
    P, k = F, 1
    while k < P.shape[0]:
        P = torch.cat([P[:k], P[k:] @ P[:-k]])
        k *= 2
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    return torch.cat([eye[None], P])


class _Overflow(Exception):
    """A batched call's lines are not finite although the field is: the steps are too long
    for the field (or the line itself overflows)."""


#: Magnus steps are taken in chunks of whole intervals whose step matrices fill about this
#: many bytes: the temporaries of a chunk stay in cache and are reused by the allocator, where
#: whole-batch temporaries would stream through memory and fault in fresh pages every call
MAGNUS_CHUNK_BYTES = 2**20


def _fixed_steps(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    n: int,
    method: MagnusMethod,
    exp_tol: float | None = None,
    line_bytes: int = 0,
) -> Tensor:
    """Wilson lines over the flat intervals `t0 -> t1` (shape `(B,)`) with `n` equal steps;
    `exp_tol` bounds each step exponential's Taylor remainder (default: roundoff). The
    lines are not checked for finiteness here (callers do, on reductions they need anyway).

    With `line_bytes` (the bytes of `w` at one time), the intervals are taken in chunks
    whose node values fill about `MAGNUS_CHUNK_BYTES`; within a chunk the field is evaluated
    in one call and all steps are one batched call."""
    size = _chunk(t0.shape[0], n * len(method.nodes) * line_bytes)
    parts = [
        _steps_product(
            _node_values(w, t1[i : i + size], t0[i : i + size], n, method),
            (t1[i : i + size] - t0[i : i + size]) / n,
            method,
            exp_tol,
        )
        for i in range(0, max(t0.shape[0], 1), size)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _chunk(B: int, per: int) -> int:
    """Intervals per chunk, `per` bytes of node values each (all of them when `per = 0`)."""
    return max(1, MAGNUS_CHUNK_BYTES // per) if per > 0 else max(B, 1)


def _one_step_checked(
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
    size = _chunk(t0.shape[0], (len(method.nodes) + len(check.nodes)) * line_bytes)
    parts, gaps = [], []
    for i in range(0, max(t0.shape[0], 1), size):
        a, b = t1[i : i + size], t0[i : i + size]
        # The field at both methods' nodes in one call.
        times = torch.cat([_node_times(a, b, 1, method), _node_times(a, b, 1, check)])
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


def _node_values(w: MatrixField, t1: Tensor, t0: Tensor, n: int, method: MagnusMethod) -> Tensor:
    """The field at the nodes of `n` steps per interval: `(B, n, s, ..., d, d)`."""
    times = _node_times(t1, t0, n, method)
    A = w(times)
    check_field(A, times.shape[0])
    return A.reshape(t0.shape[0], n, len(method.nodes), *A.shape[1:])


def _steps_product(A: Tensor, h: Tensor, method: MagnusMethod, exp_tol: float | None) -> Tensor:
    """The ordered product of the step exponentials from node values `A` `(B, n, s, ..., d,
    d)` and step lengths `h` `(B,)`: all steps of the chunk in one batched call."""
    extra = A.dim() - 5
    A = A.movedim(2, -3)
    hb = h.reshape(h.shape[0], 1, *([1] * extra), 1, 1)
    omega = method.omega(A, hb)
    steps = expm(omega, exp_tol)  # (B, n, *extra, d, d): all steps in one call
    steps = steps.movedim(1, -3)  # step axis next to the matrix axes
    return ordered_product(steps)


def _node_times(t1: Tensor, t0: Tensor, n: int, method: MagnusMethod) -> Tensor:
    """The `B · n · s` times at which `_fixed_steps` evaluates `w`, flat."""
    h = (t1 - t0) / n
    k = torch.arange(n, dtype=t0.dtype, device=t0.device)
    c = torch.tensor(method.nodes, dtype=t0.dtype, device=t0.device)
    times = t0[:, None, None] + (k[None, :, None] + c[None, None, :]) * h[:, None, None]
    return times.reshape(-1)


def _not_finite(w: MatrixField, t1: Tensor, t0: Tensor, n: int, method: MagnusMethod) -> Exception:
    """Why lines with `n` steps came out non-finite: `GaugeError` naming the times where `w`
    is not finite, else `_Overflow` (the field is finite; the steps are too long or the line
    overflows)."""
    times = _node_times(t1, t0, n, method)
    with torch.no_grad():
        error = nonfinite_field(w(times), times)
    return error if error is not None else _Overflow()


def _check_finite(
    value: float, w: MatrixField, t1: Tensor, t0: Tensor, n: int, method: MagnusMethod
) -> None:
    """Raise `GaugeError` when `value` (a reduction over lines with `n` steps) is not finite."""
    if math.isfinite(value):
        return
    why = _not_finite(w, t1, t0, n, method)
    if isinstance(why, GaugeError):
        raise why
    raise GaugeError(
        f"wilson_line: the line is not finite with {n} steps although w(t) is: the steps are "
        "too long for the field, or the line overflows (use rtol or more steps)"
    )


def _doubling_pair(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    n: int,
    method: MagnusMethod,
    exp_tol: float | None,
    line_bytes: int = 0,
) -> tuple[Tensor, Tensor]:
    """The lines over `t0 -> t1` with `n` and with `2 n` steps, in one batched call: the
    `2 n`-step line is the product of the `n`-step lines over the two halves."""
    B, mid = t0.shape[0], 0.5 * (t0 + t1)
    W = _fixed_steps(
        w, torch.cat([t1, mid, t1]), torch.cat([t0, t0, mid]), n, method, exp_tol, line_bytes
    )
    return W[:B], W[2 * B :] @ W[B : 2 * B]


def _relative_gap(a: Tensor, b: Tensor) -> float:
    """Largest over intervals of `max|a - b| / max|b|` (matrices are the last two axes)."""
    num = (a - b).detach().abs().amax(dim=(-2, -1))
    den = b.detach().abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(b.dtype).tiny)
    return float((num / den).max()) if num.numel() else 0.0


#: `rtol` searches with Runge-Kutta from this dimension on (see `wilson_line`)
RK_MIN_DIM = 64
#: RK8 takes the intervals in chunks of about this many bytes of stages
RK_CHUNK_BYTES = 2**25


def _rk_pieces(A0: Tensor, lengths: Tensor, rtol: float, room: int) -> int:
    """Pieces per interval for RK8: about a third of the steps RK8's first step predicts
    (error `~ (h ν)^9` at `rtol`, `ν` the field's largest entry times the interval's
    length), at most 8 and at most `room` (the chunk's intervals per line)."""
    with torch.no_grad():
        size = A0.detach().abs().flatten(1).amax(1) * lengths.abs()
        nu = float(size.max()) if size.numel() else 0.0
    if not math.isfinite(nu) or nu == 0.0:
        return 1
    steps = nu / (0.5 * rtol ** (1.0 / 9.0))
    return max(1, min(8, room, round(steps / 3)))


#: the largest step count of the first refinement pair (see `_first_steps`)
FIRST_STEPS_CAP = 16


def _first_steps(A0: Tensor, lengths: Tensor, rtol: float) -> int:
    """The step count of the first pair: about where Magnus6's error `~ (h ν)^7` reaches
    `rtol`, from `ν` = the field's size `‖w(t0)‖_F / √d` times the interval's length, kept to
    `[1, FIRST_STEPS_CAP]` (the pair's estimate then predicts the final count). A pair near
    the final count saves a second batched call, which at small `d` costs more than the
    steps; the cap bounds the work a field much larger at `t0` than elsewhere can waste."""
    d = A0.shape[-1]
    with torch.no_grad():
        size = A0.detach().flatten(1).norm(dim=1) / math.sqrt(d) * lengths.abs()
        nu = float(size.max()) if size.numel() else 0.0
    if not math.isfinite(nu):
        return 4
    return min(FIRST_STEPS_CAP, max(1, math.ceil(nu * rtol ** (-1.0 / 7.0) / 3.4)))


def _magnus_search(
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
        W, gap = _one_step_checked(w, t1, t0, method, exp_tol(1), line_bytes)
        estimate = one_step_estimate(gap, p, method.embedded.order) + exp_tol(1)
        if estimate <= rtol:
            return W, estimate
        if math.isfinite(gap):
            budget(2, err)
            fine = _fixed_steps(w, t1, t0, 2, method, exp_tol(2), line_bytes)
            prev, m = W, 2
            err = _relative_gap(prev, fine) / (2**p - 1)
            if err <= rtol:
                return fine + (fine - prev) / (2**p - 1), err
            if not math.isfinite(err):  # the search below diagnoses it from the start
                prev = fine = None
                err, m = math.inf, n
    while True:
        if fine is None:
            budget(3 * n, err)
            prev, fine = _doubling_pair(w, t1, t0, n, method, exp_tol(2 * n), line_bytes)
            m, used = 2 * n, n
            err = _relative_gap(prev, fine) / (2**p - 1)
        else:
            # Aim below the tolerance: estimates from few steps are often optimistic.
            grow = max(1.25, (err / (0.3 * rtol)) ** (1.0 / p))
            new_m = min(math.ceil(m * grow), max_steps)
            budget(new_m, err)
            new = _fixed_steps(w, t1, t0, new_m, method, exp_tol(new_m), line_bytes)
            err = _relative_gap(fine, new) / ((new_m / m) ** p - 1)
            prev, fine, n, m, used = fine, new, m, new_m, new_m
        if not math.isfinite(err):
            why = _not_finite(w, t1, t0, used, method)
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
    return fine + (fine - prev) / ((m / n) ** p - 1), err


def choose_method(d: int, steps: int | None, first: int) -> MagnusMethod | RK8:
    """The default method: `Magnus6` with fixed `steps`, below `d = RK_MIN_DIM`, and for
    intervals short enough for one step (`first == 1`, where one step and its embedded
    check cost about half of RK8's twelve stages); `RK8` otherwise, where a Magnus step's
    products (commutators, exponential, ordered product) cost more than the Runge-Kutta
    stages they save."""
    if steps is not None or d < RK_MIN_DIM or first == 1:
        return Magnus6()
    return RK8()


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
    t1, t0 = torch.broadcast_tensors(t1, t0)
    shape = t1.shape
    t1f, t0f = t1.reshape(-1), t0.reshape(-1)
    if not (torch.isfinite(t1f).all() and torch.isfinite(t0f).all()):
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
        W = _fixed_steps(w, t1f, t0f, steps or 1, magnus)
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
    line_bytes = A0[0].numel() * itemsize  # the field at one time
    rtol_eff = rtol if rtol is not None else min_rtol(dtype)
    first = steps if steps is not None else _first_steps(A0, t1f - t0f, rtol_eff)
    if steps is None:  # the pair's finer half stays within the step budget
        first = min(first, max(1, max_steps // 2))
    if method is None:
        method = choose_method(d, steps, first)

    def budget(n: int, err: float) -> None:
        reached = f"error estimate reached {err:.2e}" if math.isfinite(err) else "no estimate yet"
        check_memory(n, lines, d, itemsize, max_bytes, reached)

    if isinstance(method, RK8):
        check_memory(1, lines, d, itemsize, max_bytes, "RK8 keeps 13 stages per line")

        def rk_budget(taken: int, sigma: float) -> None:
            if taken >= max_steps:
                raise GaugeError(
                    f"wilson_line: the step budget max_steps={max_steps} is spent at "
                    f"{sigma:.3g} of the interval (RK8, rtol={rtol:.1e})"
                )

        fixed = steps if rtol is None else None
        # Intervals in chunks whose stages fit in cache (about 27 d × d tensors per line):
        # one pass over a large batch would stream every stage through memory.
        chunk = max(1, RK_CHUNK_BYTES // (27 * (lines // B) * d * d * itemsize))
        pieces = 1 if fixed is not None else _rk_pieces(A0, t1f - t0f, rtol, chunk // B)
        if pieces > 1:
            # Few long intervals: each cut into pieces integrated side by side (fewer
            # sequential stages, batched products); tolerance per piece rtol / pieces, which
            # is the same local tolerance per unit time.
            k = torch.arange(pieces + 1, dtype=dtype, device=t1f.device) / pieces
            cuts = t0f[:, None] + k[None, :] * (t1f - t0f)[:, None]
            a, b = cuts[:, :-1].reshape(-1), cuts[:, 1:].reshape(-1)
            Wp, err = rk_lines(w, b, a, rtol / pieces, rk_budget)
            Wp = Wp.reshape(B, pieces, *Wp.shape[1:]).movedim(1, -3)
            W, err = ordered_product(Wp), err * pieces
        else:
            parts = [
                rk_lines(w, t1f[i : i + chunk], t0f[i : i + chunk], rtol or 1.0, rk_budget, fixed)
                for i in range(0, B, chunk)
            ]
            W = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
            err = max(p[1] for p in parts)
        return (
            (W.reshape(*shape, *W.shape[1:]), err)
            if return_error
            else W.reshape(*shape, *W.shape[1:])
        )

    if rtol is None and not return_error:
        budget(steps, math.inf)
        W = _fixed_steps(w, t1f, t0f, steps, method, None, line_bytes)
        _check_finite(float(W.detach().abs().amax()), w, t1f, t0f, steps, method)
        return W.reshape(*shape, *W.shape[1:])

    n = first
    # Intermediate results only need a graph when w carries one (training).
    track = torch.is_grad_enabled() and A0.requires_grad
    with torch.set_grad_enabled(track):
        if rtol is None:  # steps with return_error: one pair, its estimate
            budget(3 * steps, math.inf)
            prev, fine = _doubling_pair(w, t1f, t0f, steps, method, None, line_bytes)
            err = _relative_gap(prev, fine) / (2**method.order - 1)
            _check_finite(err, w, t1f, t0f, steps, method)
            fine = fine + (fine - prev) / (2**method.order - 1)
        else:
            fine, err = _magnus_search(w, t1f, t0f, method, rtol, n, max_steps, budget, line_bytes)
    W = fine.reshape(*shape, *fine.shape[1:])
    return (W, err) if return_error else W
