"""Linear neural ODEs (eq. 21-27, 32, 46): solution, gauge transformations, discretization,
gauge fixing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gaugenet import GaugeError
from gaugenet.nets import LinearNetwork
from gaugenet.ode import (
    Chebyshev,
    LinearNODE,
    NeuralODE,
    PiecewiseConstant,
    TimePath,
    lift_network,
    random_gauge_path,
    wilson_line,
)

F64 = torch.float64


def rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def smooth_node(d: int, gen: torch.Generator, T: float = 1.0) -> LinearNODE:
    w = Chebyshev.random((d, d), 4, T, scale=0.8, generator=gen)
    b = Chebyshev.random((d,), 3, T, generator=gen)
    return LinearNODE(w, b, T)


@pytest.fixture
def node(gen) -> LinearNODE:
    return smooth_node(4, gen, T=1.5)


@pytest.fixture
def x(gen) -> torch.Tensor:
    return torch.randn(6, 4, dtype=F64, generator=gen)


def test_explicit_solution_matches_neural_ode(node, x):
    ode = NeuralODE(node.vector_field, node.T, rtol=1e-12, atol=1e-12, method="dopri5")
    assert rel(node(x), ode(x)) < 1e-10
    ts = torch.tensor([0.0, 0.4, 1.1, 1.5], dtype=F64)
    assert rel(node.trajectory(x, ts), ode.trajectory(x, ts)) < 1e-10


def test_piecewise_constant_is_product_of_exponentials(gen, x):
    w = PiecewiseConstant.random((4, 4), 3, 1.5, generator=gen)
    node = LinearNODE(w, None, 1.5)
    expected = torch.eye(4, dtype=F64)
    for k in range(3):
        expected = torch.linalg.matrix_exp(0.5 * w.values[k].detach()) @ expected
    assert rel(node.holonomy(), expected) < 1e-13
    assert rel(node(x), x @ expected.T) < 1e-13


def test_holonomy_is_wilson_line(node):
    assert rel(node.holonomy(), wilson_line(node.w, node.T, 0.0)) < 1e-12


def test_trainable_gradient_matches_finite_difference(node, x, gen):
    params = dict(node.named_parameters())
    assert set(params) == {"w.coeffs", "b.coeffs"}
    direction = {k: torch.randn(p.shape, dtype=F64, generator=gen) for k, p in params.items()}
    loss = node(x).pow(2).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    analytic = sum(float((g * direction[k]).sum()) for g, k in zip(grads, params))
    eps = 1e-6
    with torch.no_grad():
        for k, p in params.items():
            p.add_(eps * direction[k])
        up = float(node(x).pow(2).sum())
        for k, p in params.items():
            p.sub_(2 * eps * direction[k])
        down = float(node(x).pow(2).sum())
    assert abs(analytic - (up - down) / (2 * eps)) < 1e-6 * abs(analytic)


def test_gauge_invariance_20_random_paths(node, x, gen):
    y, H = node(x), node.holonomy()
    t1, t0 = torch.tensor([1.2, 0.9], dtype=F64), torch.tensor([0.3, 0.1], dtype=F64)
    for k in range(20):
        G, c = random_gauge_path(4, node.T, scale=0.7, generator=gen)
        new = node.gauge_transform(G, c)
        assert rel(new(x), y) < 1e-10
        assert rel(new.holonomy(), H) < 1e-10
        if k < 3:  # Wilson-line covariance (eq. 46) on interior intervals
            expected = torch.linalg.solve(G(t1), node.wilson_line(t1, t0) @ G(t0))
            assert rel(new.wilson_line(t1, t0), expected) < 1e-10
            assert rel(new.wilson_line(t1, t0), node.wilson_line(t1, t0)) > 1e-3  # w' ≠ w


def test_gauge_transform_of_scalar_callables_by_autograd(node, x, gen):
    A = torch.randn(4, 4, dtype=F64, generator=gen) / 2
    v = torch.randn(4, dtype=F64, generator=gen)
    T = node.T

    def G(t):
        return torch.linalg.matrix_exp(torch.sin(math.pi * t / T) * (A + t * A.T))

    def c(t):
        return torch.sin(math.pi * t / T) ** 2 * v

    new = node.gauge_transform(G, c)
    assert rel(new(x), node(x)) < 1e-10
    t = torch.tensor(0.6, dtype=F64)
    assert new.w(t.reshape(1)).shape == (1, 4, 4)
    assert TimePath(G)(t).shape == (4, 4)


def test_path_breaking_the_boundary_condition(node, x, gen):
    A = torch.randn(4, 4, dtype=F64, generator=gen) / 2

    def G(t):
        return torch.linalg.matrix_exp(t / node.T * A)  # G(0) = 1 but G(T) = exp(A)

    with pytest.raises(GaugeError, match=r"G\(T\)"):
        node.gauge_transform(G, None)
    changed = node.gauge_transform(G, None, check=False)
    assert rel(changed(x), node(x)) > 1e-2

    def c(t):
        return (t / node.T) * torch.ones(4, dtype=F64)

    with pytest.raises(GaugeError, match=r"c\(T\)"):
        node.gauge_transform(lambda t: torch.eye(4, dtype=F64) + 0 * t, c)


def test_path_leaving_gl_plus(node):
    def G(t):
        scale = torch.ones(4, dtype=F64) + 0 * t
        return torch.diag(torch.cat([1 - 2 * torch.sin(math.pi * t / node.T)[None], scale[1:]]))

    with pytest.raises(GaugeError, match="GL⁺"):
        node.gauge_transform(G, None)


@pytest.mark.parametrize("N", [1, 2, 3, 5, 8, 16, 32])
def test_integrated_relation_is_exact(node, x, N):
    net = node.discretize(N)
    assert isinstance(net, LinearNetwork) and net.depth == N
    assert rel(net(x), node(x)) < 1e-10
    assert rel(node.discretize(N, scheme="euler")(x), node(x)) > 1e-3


def test_euler_error_is_first_order(node, x):
    y = node(x)
    ns = np.array([16, 32, 64, 128, 256])
    errs = np.array([rel(node.discretize(int(n), scheme="euler")(x), y) for n in ns])
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - 1) < 0.2, (slope, errs)


def test_discretize_bad_arguments(node):
    with pytest.raises(GaugeError, match="scheme"):
        node.discretize(4, scheme="rk4")
    with pytest.raises(GaugeError, match="positive"):
        node.discretize(0)


def test_time_reparametrization(node, x):
    T = node.T
    eps = 1e-4
    new, (G, c) = node.reparametrize_time(
        lambda t: t + 0.2 * T / math.pi * torch.sin(math.pi * t / T)
    )
    assert rel(new(x), node(x)) < 1e-10
    t = torch.linspace(0.05, 1.45, 7, dtype=F64)
    via_gauge = node.gauge_transform(G, c)
    assert rel(via_gauge.w(t), new.w(t)) < 1e-10
    assert rel(via_gauge.b(t), new.b(t)) < 1e-10
    # Eq. (26)-(27): for τ = t + ε(t) the gauge path is G = 1 − ε w, c = −ε b to first order.
    _, (G1, c1) = node.reparametrize_time(lambda t: t + eps * torch.sin(math.pi * t / T))
    e = eps * torch.sin(math.pi * t / T)
    assert (
        float((G1(t) - torch.eye(4, dtype=F64) + e[:, None, None] * node.w(t)).detach().abs().max())
        < 1e-6
    )
    assert float((c1(t) + e[:, None] * node.b(t)).detach().abs().max()) < 1e-6
    assert float((G1(t) - torch.eye(4, dtype=F64)).detach().abs().max()) > 1e-5


def test_constant_gauge(node, x):
    new, (G, c) = node.to_constant_gauge()
    assert rel(new(x), node(x)) < 1e-10
    t = torch.linspace(0, node.T, 11, dtype=F64)
    assert float((new.w(t) - new.w(t[:1])).abs().max()) == 0.0
    assert rel(torch.linalg.matrix_exp(node.T * new.w(t[:1])[0]), node.holonomy()) < 1e-10
    via_gauge = node.gauge_transform(G, c)
    assert rel(via_gauge.w(t), new.w(t)) < 1e-10
    assert float((node.w(t) - node.w(t[:1])).abs().max()) > 1e-2  # the original is not constant


def test_straight_line_gauge(node, x):
    new, (G, c) = node.to_straight_line_gauge()
    assert rel(new(x), node(x)) < 1e-10
    t = torch.linspace(0, node.T, 7, dtype=F64)
    w0 = (node.holonomy() - torch.eye(4, dtype=F64)) / node.T
    linear = torch.eye(4, dtype=F64) + t[:, None, None] * w0
    assert rel(new.wilson_line(t, torch.zeros(()).double()), linear) < 1e-10
    traj = new.trajectory(x, t)
    assert rel(traj, x + t[:, None, None] / node.T * (node(x) - x)) < 1e-10
    via_gauge = node.gauge_transform(G, c)
    assert rel(via_gauge.w(t), new.w(t)) < 1e-10
    assert rel(node.wilson_line(t, torch.zeros(()).double()), linear) > 1e-3


def test_gauge_fixing_needs_a_holonomy_off_the_negative_axis():
    net = LinearNetwork(
        [torch.diag(torch.tensor([-1.0, -2.0, 0.5], dtype=F64))], [torch.ones(3, dtype=F64)]
    )
    node = lift_network(net)
    with pytest.raises(GaugeError, match=r"\[-2, -1\]"):
        node.to_constant_gauge()
    with pytest.raises(GaugeError, match=r"\[-2, -1\]"):
        node.to_straight_line_gauge()
