"""Theorem 3.1 made constructive (Fig. 2), its GL⁺(d) assumption, and lifting networks."""

from __future__ import annotations

import pytest
import torch

from gaugenet import GaugeError, NotLiftableError
from gaugenet.nets import LinearNetwork
from gaugenet.ode import (
    Chebyshev,
    LinearNODE,
    generator_pieces,
    lift_equivalence,
    lift_network,
    principal_log,
)

F64 = torch.float64
D, N = 3, 4


def rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def net_gap(a: LinearNetwork, b: LinearNetwork) -> float:
    ws = max(rel(x, y) for x, y in zip(a.weights, b.weights))
    return max(ws, max(rel(x, y) for x, y in zip(a.biases, b.biases)))


@pytest.fixture
def node_a(gen) -> LinearNODE:
    w = Chebyshev.random((D, D), 3, 1.0, scale=0.8, generator=gen)
    b = Chebyshev.random((D,), 2, 1.0, generator=gen)
    return LinearNODE(w, b, 1.0)


def gauge_parameters(gen, kind: str):
    eye, zero = torch.eye(D, dtype=F64), torch.zeros(D, dtype=F64)
    inner = []
    for n in range(N - 1):
        if kind == "glplus":  # random GL⁺; G_1⁻¹ G_2 has negative eigenvalues (no real log)
            G = torch.linalg.matrix_exp(0.6 * torch.randn(D, D, dtype=F64, generator=gen))
            if n == 1:
                Q = torch.linalg.qr(torch.randn(D, D, dtype=F64, generator=gen))[0]
                G = inner[0] @ Q @ torch.diag(torch.tensor([-1.5, -0.5, 1.0], dtype=F64)) @ Q.T
        elif kind == "relu":  # positive diagonal rescalings (Sec. 3.2), c = 0
            G = torch.diag(torch.exp(torch.randn(D, dtype=F64, generator=gen)))
        else:  # a reflection at every interior layer
            G = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=F64))
        inner.append(G)
    Gs = [eye, *inner, eye]
    if kind == "relu":
        cs = [zero] * (N + 1)
    else:
        cs = [zero, *[torch.randn(D, dtype=F64, generator=gen) for _ in range(N - 1)], zero]
    return Gs, cs


@pytest.mark.parametrize("kind", ["glplus", "relu"])
def test_commutative_diagram(node_a, gen, kind):
    Gs, cs = gauge_parameters(gen, kind)
    net_b = node_a.discretize(N).gauge_transform(Gs, cs)
    G, c, node_b = lift_equivalence(node_a, Gs, cs, N)
    if kind == "glplus":  # the polar route is exercised
        assert principal_log(torch.linalg.solve(Gs[1], Gs[2])) is None
    knots = torch.linspace(0, 1, N + 1, dtype=F64)
    assert rel(G(knots), torch.stack(Gs)) < 1e-12
    assert float((c(knots) - torch.stack(cs)).abs().max()) < 1e-12
    assert net_gap(node_b.discretize(N), net_b) < 1e-10
    x = torch.randn(5, D, dtype=F64, generator=gen)
    assert rel(node_b(x), node_a(x)) < 1e-10
    assert net_gap(node_a.discretize(N), net_b) > 1e-2  # NN_B is a different network
    if kind == "relu":  # the lifted path stays diagonal and positive
        mid = G(torch.linspace(0, 1, 9, dtype=F64))
        off = mid - torch.diag_embed(torch.diagonal(mid, dim1=-2, dim2=-1))
        assert float(off.abs().max()) < 1e-12
        assert bool((torch.diagonal(mid, dim1=-2, dim2=-1) > 0).all())


def test_reflection_is_not_liftable(node_a, gen):
    Gs, cs = gauge_parameters(gen, "reflection")
    net_b = node_a.discretize(N).gauge_transform(Gs, cs)
    dets = [float(torch.linalg.det(w.detach())) for w in net_b.weights]
    assert dets[0] < 0 and dets[-1] < 0 and dets[1] > 0
    assert all(float(torch.linalg.det(w.detach())) > 0 for w in node_a.discretize(N).weights)
    with pytest.raises(NotLiftableError, match=r"n = \[0, 3\]") as info:
        lift_equivalence(node_a, Gs, cs, N)
    assert "footnote 9" in str(info.value) and "[1, 2, 3]" in str(info.value)
    with pytest.raises(NotLiftableError, match=r"layers \[0, 3\]"):
        lift_network(net_b)
    # The discrete symmetry itself is exact: NN_B computes what NN_A computes.
    x = torch.randn(5, D, dtype=F64, generator=gen)
    assert rel(net_b(x), node_a.discretize(N)(x)) < 1e-10


def test_lift_equivalence_checks_its_input(node_a, gen):
    Gs, cs = gauge_parameters(gen, "glplus")
    with pytest.raises(GaugeError, match="G_0"):
        lift_equivalence(node_a, [2 * Gs[0], *Gs[1:]], cs, N)
    with pytest.raises(GaugeError, match="N \\+ 1"):
        lift_equivalence(node_a, Gs[:-1], cs, N)


def random_network(gen, depth: int, negative_eigs: bool) -> LinearNetwork:
    ws = []
    for n in range(depth):
        w = torch.randn(D, D, dtype=F64, generator=gen)
        if torch.linalg.det(w) < 0:
            w = -w if D % 2 else w[[1, 0, 2]]
        if negative_eigs and n % 2 == 0:  # eigenvalues −1.5, −0.5 (det > 0, no real log)
            Q = torch.linalg.qr(torch.randn(D, D, dtype=F64, generator=gen))[0]
            w = Q @ torch.diag(torch.tensor([-1.5, -0.5, 2.0], dtype=F64)) @ Q.T
        ws.append(w)
    return LinearNetwork(ws, [torch.randn(D, dtype=F64, generator=gen) for _ in range(depth)])


@pytest.mark.parametrize("negative_eigs", [False, True])
def test_lift_network_round_trip(gen, negative_eigs):
    for depth in (1, 3, 5):
        net = random_network(gen, depth, negative_eigs)
        node = lift_network(net, T=2.0)
        assert node.T == 2.0
        assert net_gap(node.discretize(depth), net) < 1e-10
        x = torch.randn(4, D, dtype=F64, generator=gen)
        assert rel(node(x), net(x)) < 1e-10
    if negative_eigs:
        assert principal_log(net.weights[0]) is None
        assert len(generator_pieces(net.weights[0])) == 2


def test_generator_pieces_reproduce_the_matrix(gen):
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=gen))[0]
    M = Q @ torch.diag(torch.tensor([-1.0, -3.0, 0.5, 2.0], dtype=F64)) @ Q.T
    R = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=F64))  # rotation by π
    for A in (M, R, torch.linalg.matrix_exp(torch.randn(4, 4, dtype=F64, generator=gen))):
        out = torch.eye(4, dtype=F64)
        for L in generator_pieces(A):
            out = torch.linalg.matrix_exp(L) @ out
        assert rel(out, A) < 1e-12
