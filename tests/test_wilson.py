"""Wilson lines (eq. 23): exactness, group laws, convergence order, accuracy control."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchdiffeq import odeint

from gaugenet import GaugeError
from gaugenet.ode import Magnus4, Magnus6, ordered_product, wilson_line
from gaugenet.ode._expm import expm
from wilson_fields import rel

F64 = torch.float64
METHODS = (Magnus4(), Magnus6())


def smooth_field(d: int, gen: torch.Generator, scale: float = 1.0):
    """`w(t) = A₀ + sin(3t) A₁ + cos(5t) A₂` and `∫_{t0}^{t1} tr w`."""
    A = scale * torch.randn(3, d, d, dtype=F64, generator=gen) / math.sqrt(d)
    tr = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)

    def w(t):
        return (
            A[0] + torch.sin(3 * t)[:, None, None] * A[1] + torch.cos(5 * t)[:, None, None] * A[2]
        )

    def int_trace(t1, t0):
        def prim(t):
            return tr[0] * t - tr[1] * torch.cos(3 * t) / 3 + tr[2] * torch.sin(5 * t) / 5

        return prim(t1) - prim(t0)

    return w, int_trace


def test_constant_field_is_matrix_exp(gen):
    A = torch.randn(4, 6, 6, dtype=F64, generator=gen)

    def w(t):
        return A.expand(t.shape[0], -1, -1, -1)  # extra batch axis of four fields

    t1 = torch.tensor([0.3, 1.0, 2.0], dtype=F64)
    W = wilson_line(w, t1, 0.0, steps=3)
    assert W.shape == (3, 4, 6, 6)
    expected = torch.linalg.matrix_exp(t1[:, None, None, None] * A)
    assert rel(W, expected) < 1e-13


def test_reverse_interval_is_inverse(gen):
    w, _ = smooth_field(5, gen)
    fwd = wilson_line(w, 1.3, 0.2)
    back = wilson_line(w, 0.2, 1.3)
    assert float((back @ fwd - torch.eye(5, dtype=F64)).abs().max()) < 1e-12


def test_composition_and_determinant(gen):
    w, int_trace = smooth_field(6, gen)
    t0 = torch.tensor([0.0, 0.1, -0.4], dtype=F64)
    t1 = t0 + torch.tensor([0.5, 0.9, 1.3], dtype=F64)
    t2 = t1 + torch.tensor([0.7, 0.2, 0.8], dtype=F64)
    W10, W21, W20 = wilson_line(w, t1, t0), wilson_line(w, t2, t1), wilson_line(w, t2, t0)
    assert rel(W21 @ W10, W20) < 1e-12
    det = torch.linalg.det(W20)
    assert float(((det - torch.exp(int_trace(t2, t0))) / det).abs().max()) < 1e-12
    # Negative: the product in the wrong order is not the Wilson line of the longer interval.
    assert rel(W10 @ W21, W20) > 1e-3


def test_time_ordering_matters(gen):
    # The plain exponential of ∫ w misses the ordering as soon as w(t) do not commute.
    w, _ = smooth_field(4, gen)
    ts = torch.linspace(0, 1, 2001, dtype=F64)
    integral = torch.trapezoid(w(ts), ts, dim=0)
    assert rel(torch.linalg.matrix_exp(integral), wilson_line(w, 1.0, 0.0)) > 1e-3


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_convergence_order(method, gen):
    w, _ = smooth_field(5, gen)
    ref = wilson_line(w, 1.0, 0.0, steps=400, method=Magnus6())
    ns = np.array([6, 8, 12, 16, 24])
    errs = np.array([rel(wilson_line(w, 1.0, 0.0, steps=int(n), method=method), ref) for n in ns])
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - method.order) < 0.3, (slope, errs)


def test_agrees_with_dopri8_d16(gen):
    d = 16
    w, _ = smooth_field(d, gen)
    W = wilson_line(w, 1.0, 0.0, rtol=1e-12)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    # step_t makes the last dopri8 step end at t = 1: torchdiffeq's dense output between
    # steps is of lower order than the method and would dominate the comparison.
    ref = odeint(
        lambda s, y: w(s.reshape(1))[0] @ y,
        torch.eye(d, dtype=F64),
        t,
        method="dopri8",
        rtol=1e-12,
        atol=1e-12,
        options={"step_t": t[1:]},
    )[-1]
    assert rel(W, ref) < 1e-10


@pytest.mark.parametrize("rtol", [1e-6, 1e-9, 1e-12])
def test_rtol_is_honoured(rtol, gen):
    w, _ = smooth_field(8, gen, scale=2.0)
    ref = wilson_line(w, 1.0, 0.0, steps=600)
    W, estimate = wilson_line(w, 1.0, 0.0, rtol=rtol, return_error=True)
    assert estimate <= rtol
    assert rel(W, ref) < 3 * rtol


@pytest.mark.parametrize("s", [1, 2, 3, 5, 6, 7, 11, 13, 24])
def test_ordered_product_order(s, gen):
    # Odd counts at several tree levels set factors aside; a leading batch axis rides along.
    mats = torch.randn(2, s, 3, 3, dtype=F64, generator=gen)
    expected = mats[:, 0]
    for k in range(1, s):
        expected = mats[:, k] @ expected
    assert rel(ordered_product(mats), expected) < 1e-13
    if s > 1:  # the negative check: the reversed order is a different matrix
        assert rel(ordered_product(mats.flip(1)), expected) > 1e-2


def test_gradients_flow(gen):
    A = torch.randn(2, 3, 3, dtype=F64, generator=gen, requires_grad=True)

    def w(t):
        return A[0] + t[:, None, None] * A[1]

    wilson_line(w, 1.0, 0.0, steps=4).sum().backward()
    assert A.grad is not None and float(A.grad.abs().sum()) > 0


def test_bad_input():
    with pytest.raises(GaugeError, match="steps"):
        wilson_line(lambda t: torch.zeros(t.shape[0], 2, 2, dtype=F64), 1.0, 0.0, steps=0)
    with pytest.raises(GaugeError, match="finite"):
        wilson_line(lambda t: torch.zeros(t.shape[0], 2, 2, dtype=F64), float("nan"), 0.0)


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.3, 2.0, 40.0])
def test_batched_expm_matches_torch(scale, gen):
    X = scale * torch.randn(7, 12, 12, dtype=F64, generator=gen) / math.sqrt(12)
    assert rel(expm(X), torch.linalg.matrix_exp(X)) < 1e-13
    # The negative check: a one-term truncation (1 + X) is visibly different.
    if scale >= 0.3:
        assert rel(torch.eye(12, dtype=F64) + X, torch.linalg.matrix_exp(X)) > 1e-3


def test_expm_float32_with_many_squarings(gen):
    # ‖X‖ ≈ 10⁴ in float32: about thirteen squarings, with the scaling carried by the
    # polynomial's coefficients. X is skew-symmetric, so exp(X) is orthogonal.
    G = torch.randn(3, 5, 5, dtype=F64, generator=gen)
    X = (2000.0 * (G - G.mT)).float()
    got = expm(X).double()
    assert rel(got, torch.linalg.matrix_exp(X.double())) < 1e-2
    eye = torch.eye(5, dtype=F64)
    assert float((got.mT @ got - eye).abs().max()) < 1e-2
    assert rel(got, eye.expand_as(got)) > 0.5  # far from the identity: a real rotation


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_omega_gradient(method, gen):
    # The step exponent fuses products and updates intermediates in place: its gradient
    # with respect to the node values and the step must still be exact.
    s = len(method.nodes)
    A = torch.randn(2, s, 3, 3, dtype=F64, generator=gen, requires_grad=True)
    h = torch.tensor([[[0.3]], [[0.7]]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(method.omega, (A, h))


def test_batched_expm_gradient(gen):
    X = torch.randn(2, 4, 4, dtype=F64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(expm, (X,))


def test_rtol_result_is_extrapolated_beyond_the_estimate(gen):
    w, _ = smooth_field(6, gen)
    ref = wilson_line(w, 1.0, 0.0, steps=1024)
    W, estimate = wilson_line(w, 1.0, 0.0, rtol=1e-7, return_error=True)
    assert rel(W, ref) < estimate


@pytest.mark.parametrize("degree", [2, 4, 8, 12])
def test_taylor_schemes_are_taylor_polynomials(degree):
    # On a diagonal X the scheme is its polynomial at each entry: compare with Σ x^k/k!.
    from gaugenet.ode._expm import _SCHEMES

    x = torch.tensor([0.03, -0.2, 0.5, 0.9], dtype=F64)
    X = torch.diag(x)[None]
    got = _SCHEMES[degree](X, X @ X, 1.0)[0].diagonal()
    taylor = sum(x**k / math.factorial(k) for k in range(degree + 1))
    assert float((got - taylor).abs().max()) < 1e-15
    # Negative: one degree less is visibly different at x = 0.9.
    lower = sum(x**k / math.factorial(k) for k in range(degree))
    assert float((got - lower).abs().max()) > 0.9**degree / math.factorial(degree) / 2


@pytest.mark.parametrize("tol", [1e-6, 1e-10, 1e-14])
def test_expm_with_tolerance(tol, gen):
    from gaugenet.ode._expm import expm_plan

    X = 0.3 * torch.randn(5, 10, 10, dtype=F64, generator=gen) / math.sqrt(10)
    assert rel(expm(X, tol), torch.linalg.matrix_exp(X)) < tol
    # A looser tolerance never costs more products than a tighter one.
    n1 = float(torch.linalg.matrix_norm(X).amax())
    n2 = float(torch.linalg.matrix_norm(X @ X).amax())
    costs = {2: 1, 4: 2, 8: 3, 12: 5}
    loose, tight = expm_plan(n1, n2, tol), expm_plan(n1, n2, tol * 1e-2)
    assert costs[loose[0]] + loose[1] <= costs[tight[0]] + tight[1]
