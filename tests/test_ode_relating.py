"""The converse of Theorem 2.1: `relating_diffeo` recovers the hidden gauge transformation."""

from __future__ import annotations

import torch

from gaugenet.ode import MLPField, NeuralODE, relating_diffeo

F64 = torch.float64


class _HiddenPair:
    """Node B = node A pulled back by `φ_t(x) = x + w(t) C tanh(A x + b)`, by hand.

    The pullback here is written out (no autodiff), so it checks the library's
    pullback independently.
    """

    def __init__(self, d: int, gen: torch.Generator, boundary: bool = True) -> None:
        self.field_a = MLPField(d, 16, generator=gen)
        self.A = torch.randn(8, d, dtype=F64, generator=gen) / d**0.5
        self.b = torch.randn(8, dtype=F64, generator=gen)
        self.C = torch.randn(d, 8, dtype=F64, generator=gen) * 0.3 / 8**0.5
        self.boundary = boundary

    def w(self, t):
        return 4 * t * (1 - t) if self.boundary else t

    def w_dot(self, t):
        return 4 * (1 - 2 * t) if self.boundary else torch.ones_like(t)

    def phi(self, t, x):
        return x + self.w(t) * torch.tanh(x @ self.A.T + self.b) @ self.C.T

    def field_b(self, t, x):
        h = torch.tanh(x @ self.A.T + self.b)
        jac = (
            torch.eye(x.shape[-1], dtype=F64)
            + self.w(t) * (self.C * (1 - h**2)[:, None, :]) @ self.A
        )
        rhs = self.field_a(t, self.phi(t, x)) - self.w_dot(t) * h @ self.C.T
        return torch.linalg.solve(jac, rhs[..., None])[..., 0]


def test_relating_diffeo_recovers_gauge(gen: torch.Generator) -> None:
    d = 2
    pair = _HiddenPair(d, gen)
    node_a = NeuralODE(pair.field_a, 1.0, rtol=1e-10, atol=1e-10)
    node_b = NeuralODE(pair.field_b, 1.0, rtol=1e-10, atol=1e-10)
    z = torch.randn(50, d, dtype=F64, generator=gen)
    with torch.no_grad():
        assert (node_a(z) - node_b(z)).abs().max() < 1e-8  # the hidden pair is equivalent
        phi = relating_diffeo(node_a, node_b, n_steps=32)
        e0, eT = phi.boundary_error(node_b(z))
        assert e0 == 0.0 and eT < 1e-7
        # it is the hidden map itself, away from the ends
        t = torch.tensor(0.5, dtype=F64)
        assert (phi(t, z) - pair.phi(t, z)).abs().max() < 1e-7
        assert (pair.phi(t, z) - z).abs().max() > 1e-2
    # node_a pulled back by it has node_b's field: 1000 spacetime points
    pulled = node_a.pullback(phi).field
    errs, sizes = [], []
    for t in torch.rand(4, dtype=F64, generator=gen):
        x = torch.randn(250, d, dtype=F64, generator=gen)
        with torch.no_grad():
            errs.append((pulled(t, x) - pair.field_b(t, x)).abs().max().item())
            sizes.append((pair.field_b(t, x) - pair.field_a(t, x)).abs().max().item())
    assert max(errs) < 1e-6
    assert min(sizes) > 1e-2  # the two fields differ: the match is not trivial


def test_inequivalent_pair_is_detected(gen: torch.Generator) -> None:
    d = 2
    pair = _HiddenPair(d, gen, boundary=False)  # φ_T ≠ id: not a gauge transformation
    node_a = NeuralODE(pair.field_a, 1.0, rtol=1e-10, atol=1e-10)
    node_b = NeuralODE(pair.field_b, 1.0, rtol=1e-10, atol=1e-10)
    z = torch.randn(20, d, dtype=F64, generator=gen)
    with torch.no_grad():
        _, eT = relating_diffeo(node_a, node_b, n_steps=32).boundary_error(node_b(z))
    assert eT > 1e-2
