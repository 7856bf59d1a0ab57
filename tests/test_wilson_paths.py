"""Wilson lines' fast paths: the embedded one-step check, cache-sized chunks of intervals and
the default method, each against the plain path it replaces (and a case it must not take)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gaugenet import GaugeError
from gaugenet.ode import (
    RK8,
    Magnus4,
    Magnus6,
    _magnus_search,
    _magnus_steps,
    _method_choice,
    _one_step,
    _wilson,
    wilson_line,
)
from wilson_fields import field, rel

F64 = torch.float64


def short_intervals(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    edges = torch.linspace(0.0, 1.0, n + 1, dtype=F64)
    return edges[1:], edges[:-1]


def count_refinements(monkeypatch) -> list[int]:
    """Step counts of the refinement solves `wilson_line` makes (the one-step check is not
    one of them)."""
    calls: list[int] = []
    plain = _magnus_steps.fixed_steps

    def spy(w, t1, t0, n, *args, **kwargs):
        calls.append(n)
        return plain(w, t1, t0, n, *args, **kwargs)

    # Every module that solves with fixed steps looks the function up by this name.
    monkeypatch.setattr(_magnus_steps, "fixed_steps", spy)
    monkeypatch.setattr(_wilson, "fixed_steps", spy)
    return calls


def test_embedded_check_accepts_one_step_per_short_interval(gen, monkeypatch):
    w = field(6, gen)
    t1, t0 = short_intervals()
    ref = wilson_line(w, t1, t0, steps=64)
    calls = count_refinements(monkeypatch)
    W, estimate = wilson_line(w, t1, t0, rtol=1e-6, return_error=True)
    assert calls == []  # one step and its check, no refinement pair
    assert estimate <= 1e-6
    # The estimate is Magnus6's error estimated from the bound of its gap to Magnus4.
    assert rel(W, ref) < estimate / 10
    # Exact structure is kept: the reversed intervals give the inverses.
    back = wilson_line(w, t0, t1, rtol=1e-6)
    assert rel(back @ W, torch.eye(6, dtype=F64).expand_as(W)) < 1e-12


def test_embedded_check_refuses_a_tolerance_below_its_bound(gen, monkeypatch):
    # Negative: below the bound the single step is not accepted; the pair search takes over
    # (the one step reused as its coarse result) and still meets the tolerance.
    w = field(6, gen)
    t1, t0 = short_intervals()
    _, bound = _one_step.one_step_checked(w, t1, t0, Magnus6(), 1e-16)
    rtol = _one_step.one_step_estimate(bound, 6, 4) / 100
    calls = count_refinements(monkeypatch)
    W, estimate = wilson_line(w, t1, t0, rtol=rtol, return_error=True)
    assert calls and calls[0] == 2
    assert estimate <= rtol
    assert rel(W, wilson_line(w, t1, t0, steps=64)) < 3 * rtol


def embedded_exponents(w, t1, t0, method=None):
    """One step's `Ω` and the embedded exponent `Ω_e` per interval: `(B, d, d)` each."""
    method = method or Magnus6()
    A = _magnus_steps.node_values(w, t1, t0, 1, method)[:, 0]
    Ae = _magnus_steps.node_values(w, t1, t0, 1, method.embedded)[:, 0]
    omega, gap = method.omega_and_gap(A, Ae, (t1 - t0)[:, None, None])
    return omega, omega - gap


def test_embedded_bound_covers_the_exponentiated_gap(gen):
    w = field(5, gen)
    t1, t0 = short_intervals(8)
    W, bound = _one_step.one_step_checked(w, t1, t0, Magnus6(), 1e-16)
    omega, other = embedded_exponents(w, t1, t0)
    We = torch.linalg.matrix_exp(other)
    gap = float(((W - We).abs().amax((-2, -1)) / W.abs().amax((-2, -1))).max())
    assert 0 < gap <= bound < 3 * gap  # a bound, and a tight one
    assert rel(W, wilson_line(w, t1, t0, steps=1, method=Magnus6())) < 1e-14
    assert rel(W, torch.linalg.matrix_exp(omega)) < 1e-14


def test_embedded_exponent_has_order_4(gen):
    # The embedded exponent (two-node quadrature, Magnus6's commutator) is a fourth-order
    # step: its gap to Magnus6 shrinks as h^5 (its local error), and it is as close to
    # the exact line as Magnus4's step (same order, same leading commutator).
    w = field(5, gen)
    hs = np.array([1 / 8, 1 / 16, 1 / 32, 1 / 64])
    gaps, errors, mine = [], [], []
    for h in hs:
        t0 = torch.tensor([0.1], dtype=F64)
        omega, other = embedded_exponents(w, t0 + h, t0)
        gaps.append(float((omega - other).abs().max()))
        ref = wilson_line(w, t0 + h, t0, steps=16)
        errors.append(rel(torch.linalg.matrix_exp(other), ref))
        mine.append(rel(torch.linalg.matrix_exp(omega), ref))
    slope = np.polyfit(np.log(hs), np.log(gaps), 1)[0]
    assert abs(slope - 5) < 0.3, (slope, gaps)
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - 5) < 0.3, (slope, errors)
    # Negative: Magnus6's own step is of higher order (its error falls faster).
    assert mine[0] < errors[0] / 10 and mine[1] < errors[1] / 30


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("length", [1 / 64, 1 / 16])
def test_one_step_estimate_covers_the_step(scale, length, gen):
    # Magnus6's one-step error against the estimate from the Magnus4 gap bound: above the
    # error (the step is trusted to rtol) but not by orders of magnitude (not vacuous).
    w = field(6, gen, scale)
    t0 = torch.arange(8, dtype=F64) * length
    W, bound = _one_step.one_step_checked(w, t0 + length, t0, Magnus6(), 1e-16)
    error = rel(W, wilson_line(w, t0 + length, t0, steps=64))
    estimate = _one_step.one_step_estimate(bound, 6, 4)
    assert error < estimate < 3e3 * max(error, 1e-14)
    # Negative: the gap bound itself is far above Magnus6's error (Magnus4's own error).
    assert bound > 30 * error


def test_one_step_estimate_outside_the_asymptotic_range():
    assert _one_step.one_step_estimate(1e-2, 6, 4) == 1e-2  # the gap itself
    assert _one_step.one_step_estimate(math.inf, 6, 4) == math.inf
    assert _one_step.one_step_estimate(1e-9, 6, 4) < 1e-11  # powers of a small gap


def test_embedded_bound_sees_quadrature_error_of_commuting_fields(gen):
    # w(t) = f(t) A commutes with itself: every commutator vanishes, and only the node
    # rules (three against two Gauss-Legendre nodes) tell the steps apart. The bound must
    # not be zero there; for a constant field both steps are exact.
    A = torch.randn(4, 4, dtype=F64, generator=gen)
    t1, t0 = torch.tensor([0.5], dtype=F64), torch.tensor([0.0], dtype=F64)

    def wave(t):
        return torch.exp(3 * t)[:, None, None] * A

    _, bound = _one_step.one_step_checked(wave, t1, t0, Magnus6(), 1e-16)
    assert bound > 1e-6

    def const(t):
        return A.expand(t.shape[0], 4, 4)

    _, bound = _one_step.one_step_checked(const, t1, t0, Magnus6(), 1e-16)
    assert bound < 1e-13


def test_no_embedded_method_raises(gen):
    w = field(3, gen)
    t1, t0 = short_intervals(4)
    with pytest.raises(GaugeError, match="embedded"):
        _one_step.one_step_checked(w, t1, t0, Magnus4(), 1e-12)


def test_chunks_give_the_same_lines(gen, monkeypatch):
    w = field(5, gen)
    t1 = torch.tensor([0.3, 1.0, 0.0, 2.0, -0.5], dtype=F64)
    t0 = torch.tensor([0.0, 0.2, 1.0, 1.5, 0.5], dtype=F64)
    whole = wilson_line(w, t1, t0, rtol=1e-10)
    monkeypatch.setattr(_magnus_steps, "MAGNUS_CHUNK_BYTES", 1)  # one interval per chunk
    chunked = wilson_line(w, t1, t0, rtol=1e-10)
    assert rel(chunked, whole) < 1e-13
    # Negative: chunks put back in another order would be other intervals' lines.
    assert rel(chunked.flip(0), whole) > 1e-2


def test_default_method_by_dimension_and_interval(gen):
    assert isinstance(_method_choice.choose_method(16, None, 4), Magnus6)
    assert isinstance(_method_choice.choose_method(128, None, 4), RK8)
    assert isinstance(_method_choice.choose_method(128, None, 1), Magnus6)  # one step suffices
    assert isinstance(_method_choice.choose_method(128, 8, 8), Magnus6)  # fixed steps
    # In use: a long interval at d = 64 takes RK8 (group laws to the tolerance only), short
    # ones take Magnus6 (inverse to rounding).
    w = field(64, gen)
    fwd, back = wilson_line(w, 1.0, 0.0, rtol=1e-8), wilson_line(w, 0.0, 1.0, rtol=1e-8)
    eye = torch.eye(64, dtype=F64)
    assert 1e-15 < rel(back @ fwd, eye) < 1e-6
    t1, t0 = short_intervals(8)
    fwd, back = wilson_line(w, t1, t0, rtol=1e-8), wilson_line(w, t0, t1, rtol=1e-8)
    assert rel(back @ fwd, eye.expand_as(fwd)) < 1e-13


def test_step_shape_mismatch_raises(gen):
    A = torch.randn(2, 3, 4, 4, dtype=F64, generator=gen)
    with pytest.raises(GaugeError, match="does not fit"):
        Magnus6().omega(A, torch.ones(5, 1, 1, dtype=F64))
    # Positive: a broadcastable step gives the batch's shape.
    assert Magnus6().omega(A, torch.ones(2, 1, 1, dtype=F64)).shape == (2, 4, 4)


def test_rk8_intervals_of_one_length_forward_and_back(gen):
    # Equal lengths take the path that keeps the length out of the field values (as a
    # number, negative for reversed intervals); unequal ones scale every value.
    w = field(5, gen)
    t1, t0 = short_intervals(6)
    ref = wilson_line(w, t1, t0, steps=32)
    fwd = wilson_line(w, t1, t0, rtol=1e-10, method=RK8())
    back = wilson_line(w, t0, t1, rtol=1e-10, method=RK8())
    assert rel(fwd, ref) < 1e-9
    assert rel(back @ fwd, torch.eye(5, dtype=F64).expand_as(fwd)) < 1e-9
    mixed = torch.cat([t1[:3], t0[3:]]), torch.cat([t0[:3], t1[3:]])  # unequal signs
    both = wilson_line(w, *mixed, rtol=1e-10, method=RK8())
    assert rel(both[:3], ref[:3]) < 1e-9 and rel(both[3:], back[3:]) < 1e-9
    # Negative: a line is not its interval's reverse.
    assert rel(back, fwd) > 1e-2


def test_embedded_check_with_an_extra_field_axis(gen, monkeypatch):
    # w(t) of shape (m, 3, d, d): three fields at once ride along the one-step path.
    A = torch.randn(3, 3, 4, 4, dtype=F64, generator=gen) / 2

    def w(t):
        return A[0] + torch.sin(3 * t)[:, None, None, None] * A[1] + t[:, None, None, None] * A[2]

    t1, t0 = short_intervals(16)
    calls = count_refinements(monkeypatch)
    W = wilson_line(w, t1, t0, rtol=1e-6)
    assert calls == [] and W.shape == (16, 3, 4, 4)
    ref = wilson_line(w, t1, t0, steps=16)
    assert rel(W, ref) < 1e-8
    # Negative: the fields are not interchangeable.
    assert rel(W[:, 0], W[:, 1]) > 1e-3


def test_first_pair_predicted_from_the_field_within_the_budget(gen, monkeypatch):
    # A long interval at a tight tolerance: the first pair is sized from the field (more
    # than the former four steps), the result meets the tolerance.
    w = field(6, gen, scale=2.0)
    ref = wilson_line(w, 1.0, 0.0, steps=600)
    calls = count_refinements(monkeypatch)
    W, estimate = wilson_line(w, 1.0, 0.0, rtol=1e-10, return_error=True)
    assert 4 < calls[0] <= _magnus_search.FIRST_STEPS_CAP
    assert estimate <= 1e-10 and rel(W, ref) < 3e-10
    # Negative: a budget below the predicted pair shrinks the pair to fit, and the spent
    # budget is reported.
    calls.clear()
    with pytest.raises(GaugeError, match="max_steps=6"):
        wilson_line(w, 1.0, 0.0, rtol=1e-12, max_steps=6)
    assert calls[0] == 3
