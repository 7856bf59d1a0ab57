"""The gauge-fixing regularizer (eq. 45), footnote 12's covariant term, and the general
neural-ODE regularizers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import gaugenet
from gaugenet.ode import (
    Chebyshev,
    LinearNODE,
    MLPField,
    TimePath,
    covariant_higgs_kinetic,
    gauge_fixing_regularizer,
    jacobian_frobenius_density,
    kinetic_density,
    random_gauge_path,
    regularized_solve,
    total_derivative_density,
)

D64 = torch.float64


def _node(gen, d=3, scale=0.4):
    w = Chebyshev(scale * torch.randn(3, d, d, dtype=D64, generator=gen) / math.sqrt(d))
    b = Chebyshev(scale * torch.randn(3, d, dtype=D64, generator=gen))
    return LinearNODE(w, b, 1.0)


def _rotation_path(gen, d):
    A = torch.randn(2, d, d, dtype=D64, generator=gen)
    A = A - A.transpose(-1, -2)

    def G(t):
        s = torch.sin(math.pi * t)[:, None, None]
        return torch.linalg.matrix_exp(s * (A[0] + t[:, None, None] * A[1]))

    return TimePath(G, vectorized=True)


def test_zero_exactly_on_straight_lines(gen):
    node = _node(gen)
    r0 = float(gauge_fixing_regularizer(node).detach())
    assert r0 > 1e-2  # negative: a generic node is not straight
    straight, _ = node.to_straight_line_gauge()
    assert float(gauge_fixing_regularizer(straight)) < 1e-12 * r0
    # ẍ = 0 on the straight-line gauge: trajectories are linear in t
    x0 = torch.randn(4, 3, dtype=D64, generator=gen)
    ts = torch.linspace(0, 1, 5, dtype=D64)
    xs = straight.trajectory(x0, ts)
    lin = x0 + ts[:, None, None] * (xs[-1] - x0)
    torch.testing.assert_close(xs, lin, rtol=0, atol=1e-9)
    # the density is ‖ẍ‖²-type: the density of eq. (45) matches the field's total derivative
    t = torch.tensor(0.3, dtype=D64)
    acc = total_derivative_density(node.vector_field, t, torch.eye(3, dtype=D64))
    w, b = node.w(t.reshape(1))[0], node.b(t.reshape(1))[0]
    wd = torch.func.jvp(node.w, (t.reshape(1),), (torch.ones(1, dtype=D64),))[1][0]
    assert float(acc.sum().detach()) > 0
    assert torch.isfinite(w @ w + wd).all() and torch.isfinite(b).all()


def test_footnote12_covariant_term(gen):
    node = _node(gen)
    zero_c = TimePath(lambda t: torch.zeros(t.shape[0], 3, dtype=D64), vectorized=True)
    rotated = node.gauge_transform(_rotation_path(gen, 3), zero_c)
    k0, k1 = float(covariant_higgs_kinetic(node)), float(covariant_higgs_kinetic(rotated))
    assert abs(k1 - k0) < 1e-9 * max(1.0, k0)

    # the (∂_t + w) b part of eq. (45) is not invariant under the same rotation
    def higgs45(n):
        return gauge_fixing_regularizer(n) - _w_part(n)

    assert abs(float(higgs45(rotated)) - float(higgs45(node))) > 1e-3
    # a GL path changes the covariant term
    G, _ = random_gauge_path(3, generator=gen)
    gl = node.gauge_transform(G, zero_c)
    assert abs(float(covariant_higgs_kinetic(gl)) - k0) > 1e-3


def _w_part(node):
    from gaugenet.ode import gauss_legendre

    t, wq = gauss_legendre(torch.tensor([0.0, node.T], dtype=D64), 24)
    w, wd = torch.func.jvp(node.w, (t,), (torch.ones_like(t),))
    return (wq * ((wd + w @ w) ** 2).sum((-1, -2))).sum()


def test_gradcheck_linear_node_regularizers(gen):
    cw = (0.3 * torch.randn(2, 2, 2, dtype=D64, generator=gen)).requires_grad_(True)
    cb = (0.3 * torch.randn(2, 2, dtype=D64, generator=gen)).requires_grad_(True)

    def build(a, b):
        wm, bm = Chebyshev(a.detach()), Chebyshev(b.detach())
        del wm.coeffs, bm.coeffs
        wm.coeffs, bm.coeffs = a, b
        return LinearNODE(wm, bm, 1.0)

    assert gradcheck(lambda a, b: gauge_fixing_regularizer(build(a, b), order=8), (cw, cb))
    assert gradcheck(lambda a, b: covariant_higgs_kinetic(build(a, b), order=8), (cw, cb))


def test_gradcheck_node_densities(gen):
    field = MLPField(2, hidden=4, generator=gen)
    x = torch.randn(3, 2, dtype=D64, generator=gen, requires_grad=True)
    t = torch.tensor(0.4, dtype=D64)
    probes = torch.randn(2, 3, 2, dtype=D64, generator=gen)
    for fn in (
        lambda z: kinetic_density(field, t, z),
        lambda z: jacobian_frobenius_density(field, t, z, probes),
        lambda z: total_derivative_density(field, t, z),
    ):
        assert gradcheck(fn, (x,))
    names = ("kinetic", "jacobian", "total_derivative")
    for name in names:
        assert gradcheck(
            lambda z: regularized_solve(
                field,
                z,
                0.5,
                probes=probes,
                method="rk4",
                regularizers=names,
                options={"step_size": 0.25},
            )[1][name],  # noqa: B023 (called at once, inside the loop)
            (x,),
        )


def test_densities_against_exact_jacobian(gen):
    field = MLPField(3, hidden=5, generator=gen)
    x = torch.randn(4, 3, dtype=D64, generator=gen)
    t = torch.tensor(0.2, dtype=D64)
    J = torch.func.vmap(torch.func.jacrev(lambda z: field(t, z[None])[0]))(x)
    exact = (J**2).sum((-1, -2))
    # Hutchinson with the full basis as probes (times √d) is exact
    basis = torch.eye(3, dtype=D64)[:, None, :].expand(3, 4, 3) * math.sqrt(3)
    torch.testing.assert_close(jacobian_frobenius_density(field, t, x, basis), exact)
    dt = torch.func.jacfwd(lambda s: field(s, x))(t)
    acc = dt + (J @ field(t, x)[..., None])[..., 0]
    torch.testing.assert_close(total_derivative_density(field, t, x), (acc**2).sum(-1))
    # augmented-state integrals agree with quadrature along the solved trajectory
    probes = torch.randn(2, 4, 3, dtype=D64, generator=gen)
    xT, reg = regularized_solve(field, x, 1.0, probes=probes, rtol=1e-10, atol=1e-12)
    from gaugenet.ode import NeuralODE, gauss_legendre

    tq, wq = gauss_legendre(torch.tensor([0.0, 1.0], dtype=D64), 16)
    traj = NeuralODE(field, 1.0, rtol=1e-10, atol=1e-12).trajectory(
        x, torch.cat([torch.zeros(1, dtype=D64), tq])
    )[1:]
    ke = sum(wq[i] * kinetic_density(field, tq[i], traj[i]) for i in range(len(tq)))
    torch.testing.assert_close(reg["kinetic"], ke, rtol=1e-7, atol=1e-9)
    with pytest.raises(gaugenet.GaugeError):
        regularized_solve(field, x, 1.0, regularizers=("jacobian",))
    with pytest.raises(gaugenet.GaugeError):
        regularized_solve(field, x, 1.0, regularizers=("nope",))
