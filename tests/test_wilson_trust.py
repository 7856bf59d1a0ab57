"""Wilson lines never return a silent wrong answer: bad fields, tolerances and budgets raise
`GaugeError`, each beside a good case that still reaches its tolerance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gaugenet import GaugeError
from gaugenet.ode import RK8, Magnus6, MagnusMethod, wilson_line
from wilson_fields import field, rel

F64 = torch.float64


def poisoned(w, bad: float, at: float = 0.5, width: float = 0.05):
    """`w` with the value `bad` wherever `|t - at| < width`."""

    def f(t):
        out = w(t)
        hit = (t - at).abs() < width
        return torch.where(hit[:, None, None], torch.full_like(out, bad), out)

    return f


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("how", ["rtol", "steps", "rk8"])
def test_nonfinite_field_raises(bad, how, gen):
    w = field(4, gen)
    kwargs = {"rtol": {}, "steps": {"steps": 8}, "rk8": {"method": RK8(), "rtol": 1e-8}}[how]
    with pytest.raises(GaugeError, match="not finite"):
        wilson_line(poisoned(w, bad), 1.0, 0.0, **kwargs)
    # Positive: the same field poisoned outside the interval is fine.
    W = wilson_line(poisoned(w, bad, at=5.0), 1.0, 0.0, **kwargs)
    assert rel(W, wilson_line(w, 1.0, 0.0, steps=256)) < 1e-7


def test_nonfinite_times_and_bad_shapes_raise(gen):
    w = field(3, gen)
    with pytest.raises(GaugeError, match="finite"):
        wilson_line(w, math.inf, 0.0)
    with pytest.raises(GaugeError, match="shape"):
        wilson_line(lambda t: torch.zeros(3, 3, dtype=F64), 1.0, 0.0)
    with pytest.raises(GaugeError, match="shape"):
        wilson_line(lambda t: torch.zeros(t.shape[0], 3, 2, dtype=F64), 1.0, 0.0)


def test_stiff_finite_field_reaches_tolerance(gen):
    # Large, non-normal and time-dependent: the first steps of the search overflow (the
    # library once returned NaN here); the search refines until the lines are finite.
    d = 6
    A = 100 * torch.randn(2, d, d, dtype=F64, generator=gen) / math.sqrt(d)
    A[0] = -(A[0] @ A[0].T) / 100

    def w(t):
        return A[0] + torch.sin(3 * t)[:, None, None] * A[1]

    W, estimate = wilson_line(w, 1.0, 0.0, return_error=True)
    assert bool(torch.isfinite(W).all()) and estimate <= 1e-12
    ref = wilson_line(w, 1.0, 0.0, steps=3000)
    assert rel(W, ref) < 1e-9
    # Negative: far too few fixed steps give no finite line, and say so.
    with pytest.raises(GaugeError, match="not finite with 2 steps"):
        wilson_line(w, 1.0, 0.0, steps=2)


def test_exhausted_budget_raises_with_estimate(gen):
    w = field(5, gen, scale=2.0)
    with pytest.raises(GaugeError, match=r"max_steps=16 is spent with an error estimate of"):
        wilson_line(w, 1.0, 0.0, rtol=1e-12, max_steps=16)
    with pytest.raises(GaugeError, match="max_steps=3"):
        wilson_line(w, 1.0, 0.0, rtol=1e-12, max_steps=3, method=RK8())
    # Positive: the default budget reaches the tolerance.
    W, estimate = wilson_line(w, 1.0, 0.0, rtol=1e-12, return_error=True)
    assert estimate <= 1e-12
    assert rel(W, wilson_line(w, 1.0, 0.0, steps=600)) < 3e-12


class _Midpoint(MagnusMethod):
    """The exponential midpoint rule (order 2), declaring `order`."""

    nodes = (0.5,)

    def __init__(self, order: int):
        self.order = order

    def omega(self, A, h):
        return (A[..., 0, :, :] * h).reshape(
            torch.broadcast_shapes(A.shape[:-3] + A.shape[-2:], h.shape)
        )


def test_wrong_order_is_stopped_by_the_memory_cap(gen):
    # A method that claims order 6 but has order 2: every prediction is short, so the search
    # keeps growing; the memory cap stops it with a clear error instead of exhausting memory.
    w = field(4, gen)
    with pytest.raises(GaugeError, match="max_bytes"):
        wilson_line(w, 1.0, 0.0, rtol=1e-12, method=_Midpoint(order=6), max_bytes=2**22)
    # Positive: declared honestly, the same rule reaches a modest tolerance.
    W = wilson_line(w, 1.0, 0.0, rtol=1e-6, method=_Midpoint(order=2), max_bytes=2**26)
    assert rel(W, wilson_line(w, 1.0, 0.0, steps=256)) < 3e-6


@pytest.mark.parametrize("rtol", [0.0, -1e-8, math.nan, math.inf, 1e-17, "x"])
def test_rtol_validated(rtol, gen):
    w = field(3, gen)
    with pytest.raises(GaugeError, match="rtol"):
        wilson_line(w, 1.0, 0.0, rtol=rtol)


def test_float32_default_rtol_is_reachable(gen):
    w32 = field(3, gen)
    W = wilson_line(lambda t: w32(t.double()).float(), torch.tensor(1.0), torch.tensor(0.0))
    ref = wilson_line(w32, 1.0, 0.0, steps=256)
    assert W.dtype == torch.float32 and rel(W.double(), ref) < 1e-5


def test_rk8_convergence_order(gen):
    w = field(5, gen)
    ref = wilson_line(w, 1.0, 0.0, steps=400, method=Magnus6())
    ns = np.array([4, 5, 6, 8, 10])
    errs = np.array([rel(wilson_line(w, 1.0, 0.0, steps=int(n), method=RK8()), ref) for n in ns])
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - RK8.order) < 0.5, (slope, errs)


def test_rk8_batched_matches_magnus(gen):
    w = field(6, gen)
    t0 = torch.tensor([0.0, 0.2, 1.0, -0.5], dtype=F64)
    t1 = torch.tensor([1.0, 0.3, 0.0, 0.7], dtype=F64)  # one reversed interval
    W, estimate = wilson_line(w, t1, t0, rtol=1e-10, method=RK8(), return_error=True)
    ref = wilson_line(w, t1, t0, steps=300)
    assert estimate <= 1e-10 and rel(W, ref) < 1e-9
    assert rel(W[2] @ W[0], torch.eye(6, dtype=F64)) < 1e-9  # inverse to tolerance
    assert rel(W[0], W[1]) > 1e-2  # negative: different intervals differ


def test_rk8_gradients(gen):
    A = torch.randn(2, 3, 3, dtype=F64, generator=gen, requires_grad=True)

    def w(t):
        return A[0] + t[:, None, None] * A[1]

    def f(A0):
        return wilson_line(
            lambda t: A0[0] + t[:, None, None] * A0[1], 1.0, 0.0, steps=3, method=RK8()
        )

    assert torch.autograd.gradcheck(f, (A,))
    wilson_line(w, 1.0, 0.0, rtol=1e-8, method=RK8()).sum().backward()
    assert A.grad is not None and float(A.grad.abs().sum()) > 0


def test_rk8_cuts_a_long_interval_into_pieces(gen):
    from gaugenet.ode._rk_wilson import PIECES_MAX_DIM, rk_pieces

    w = field(5, gen, scale=3.0)
    one, zero = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    assert rk_pieces(w(zero), one, 1e-10, room=100) > 1  # the path below is the cut one
    # From d = PIECES_MAX_DIM on the products dominate: one sequence of steps, no pieces.
    big = field(PIECES_MAX_DIM, gen, scale=3.0)
    assert rk_pieces(big(zero), one, 1e-10, room=100) == 1
    Wb, est_b = wilson_line(big, 1.0, 0.0, rtol=1e-10, method=RK8(), return_error=True)
    assert est_b <= 1e-10 and rel(Wb, wilson_line(big, 1.0, 0.0, steps=200)) < 1e-9
    W, estimate = wilson_line(w, 1.0, 0.0, rtol=1e-10, method=RK8(), return_error=True)
    ref = wilson_line(w, 1.0, 0.0, steps=400)
    assert estimate <= 1e-10 and rel(W, ref) < 1e-9
    # Negative: the pieces in the wrong order are not the line.
    half = wilson_line(w, torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.5]), steps=200)
    assert rel(half[0] @ half[1], ref) > 1e-3


@pytest.mark.parametrize("lines", [3, 40])  # the host reduction and the batched one
def test_rk8_local_error_reduction(lines, gen):
    from gaugenet.ode._rk import _largest_error

    tiny = torch.finfo(F64).tiny
    terms = torch.rand(3, lines, dtype=F64, generator=gen) + 0.1
    e5, e3, size = terms
    expected = float((e5**2 / (e5**2 + 0.01 * e3**2).sqrt() / size).max())
    assert _largest_error(terms, tiny) == pytest.approx(expected, rel=1e-14)
    # Negative: a non-finite line anywhere (not only first) is reported, never skipped.
    for bad in (math.nan, math.inf):
        poisoned_terms = terms.clone()
        poisoned_terms[0, -1] = bad
        assert not math.isfinite(_largest_error(poisoned_terms, tiny))


def test_rk8_first_step_size_counts_dense_fields(gen):
    from gaugenet.ode._rk import _field_size

    # A dense field's largest entry shrinks like 1/sqrt(d) against its norm; the size used
    # for the first step follows the root-mean-square row norm instead (below the norm).
    dense = torch.randn(1, 256, 256, dtype=F64, generator=gen) / 16
    norm = float(torch.linalg.matrix_norm(dense[0], 2))
    rms = float(dense.norm()) / 16
    assert _field_size(dense) == pytest.approx(rms) and rms <= norm
    assert 2 * float(dense.abs().max()) < 0.8 * rms  # (the entry alone would say less)
    # A peaked field (one large entry) keeps twice its largest entry, as the step always did.
    peaked = torch.zeros(1, 256, 256, dtype=F64)
    peaked[0, 3, 5] = -2.0
    assert _field_size(peaked) == 4.0
    # Batches: the largest line counts.
    both = torch.cat([dense, 3 * dense])
    assert _field_size(both) == pytest.approx(3 * rms)
