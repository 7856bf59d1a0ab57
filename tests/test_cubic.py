"""Self-attention as an integrated cubic neural ODE (eq. 38-43) and its gauge (Sec. 4.2)."""

from __future__ import annotations

import math

import pytest
import torch

import gaugenet
from gaugenet.ode import (
    CubicNODE,
    alpha_redundancy,
    attention_from_cubic,
    attention_layer_from_cubic,
    cubic_gauge_transform,
    first_order_kernel,
    token_cubic,
    wilson_line,
)

F64 = torch.float64
D, T, T0 = 4, 1.0, 0.4


def loop_field(gen: torch.Generator):
    """`w = Ġ G⁻¹` for `G(t) = e^{a(t) M₁} e^{b(t) M₂}`, `a, b` vanishing at 0 and T, so that
    `W_{t:0} = G(t)` (closed form) and the holonomy `W_{T:0}` is 1."""
    m1, m2 = (0.8 * torch.randn(D, D, generator=gen, dtype=F64) for _ in range(2))

    def parts(t):
        a = torch.sin(math.pi * t / T)[:, None, None]
        ad = (math.pi / T * torch.cos(math.pi * t / T))[:, None, None]
        bd = (1.4 * math.pi / T * torch.cos(2 * math.pi * t / T))[:, None, None]
        b = (0.7 * torch.sin(2 * math.pi * t / T))[:, None, None]
        return torch.linalg.matrix_exp(a * m1), torch.linalg.matrix_exp(b * m2), ad, bd

    def w(t):
        e1, _, ad, bd = parts(t)
        return ad * m1 + bd * e1 @ m2 @ torch.linalg.inv(e1)

    def G(t):
        e1, e2, _, _ = parts(t)
        return e1 @ e2

    return w, G


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    lx, ly = x.log(), y.log()
    return float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())


def test_wilson_lines_of_the_loop(gen):
    w, G = loop_field(gen)
    ts = torch.tensor([0.3, 0.7, 1.0], dtype=F64)
    assert float((wilson_line(w, ts, 0.0) - G(ts)).abs().max()) < 1e-10


@pytest.mark.parametrize("n", [1, 3])
def test_attention_equals_integrated_ode_to_first_order(n, gen):
    w, _ = loop_field(gen)
    lam, lt = (0.5 * torch.randn(D, D, generator=gen, dtype=F64) for _ in range(2))
    x = torch.randn(n, D, generator=gen, dtype=F64)
    node = token_cubic(w, lam, lt, n, T0, T, 1e-4)
    layer = attention_layer_from_cubic(w, lam, lt, T0, T)
    eps = torch.logspace(-1, -4, 7, dtype=F64)
    with torch.no_grad():
        out = node(x.reshape(-1).expand(len(eps), -1), eps).reshape(-1, n, D)
        att = x + eps[:, None, None] * layer(x)  # W_v ∝ λ: the layer is linear in the scale
        err = (out - att).abs().amax((1, 2))
        # negative test: queries and keys exchanged is wrong already at first order
        swapped = attention_layer_from_cubic(w, lam, lt.T, T0, T)
        err_bad = (out - x - eps[:, None, None] * swapped(x)).abs().amax((1, 2))
    assert abs(_slope(eps, err) - 2) < 0.2, err
    assert float(err[-1]) < 1e-5
    if n == 3:  # for one token swapping is harmless (x·λ̃x = x·λ̃ᵀx); for three it is not
        assert abs(_slope(eps, err_bad) - 1) < 0.2 and float(err_bad[-1]) > 100 * float(err[-1])


def test_kernel_tends_to_attention_as_sigma_vanishes(gen):
    w, _ = loop_field(gen)
    lam, lt = (0.5 * torch.randn(D, D, generator=gen, dtype=F64) for _ in range(2))
    wq, wk, wv = attention_from_cubic(w, lam, lt, T0, T)
    k_att = torch.einsum("km,lm,ji->ijkl", wq, wk, wv)  # Λ^i_{jkl} of one attention layer
    sig = torch.tensor([1e-2, 1e-3], dtype=F64)
    gaps = torch.stack(
        [
            (first_order_kernel(CubicNODE.instantaneous(w, lam, lt, T0, T, float(s)), T) - k_att)
            .abs()
            .max()
            / k_att.abs().max()
            for s in sig
        ]
    )
    assert float(gaps[-1]) < 1e-3
    assert abs(_slope(sig, gaps) - 2) < 0.2  # symmetric bump: the O(σ) term cancels


def test_kernel_matches_finite_difference(gen):
    a = 0.5 * torch.randn(D, D, generator=gen, dtype=F64)
    b = 0.5 * torch.randn(D, D, generator=gen, dtype=F64)
    lam0 = 0.3 * torch.randn(D, D, D, D, generator=gen, dtype=F64)

    def w(t):
        return a + torch.sin(3 * t)[:, None, None] * b

    node = CubicNODE(w, lambda t: (1 + t)[:, None, None, None, None] * lam0, T, steps=400)
    x0 = torch.randn(5, D, generator=gen, dtype=F64)
    kern = first_order_kernel(node, T)
    pred = torch.einsum("ijkl,nj,nk,nl->ni", kern, x0, x0, x0)
    lin = x0 @ wilson_line(w, T, 0.0).T
    eps = torch.tensor([1e-2, 1e-3, 1e-4], dtype=F64)
    with torch.no_grad():
        out = node(x0.expand(3, -1, -1), eps[:, None])
    err = ((out - lin) / eps[:, None, None] - pred).abs().amax((1, 2)) / pred.abs().max()
    assert abs(_slope(eps, err) - 1) < 0.2, err  # forward difference: O(λ)
    assert float(err[-1]) < 1e-2


def test_spatial_diffeo_is_alpha_one_part(gen):
    w, _ = loop_field(gen)
    lam, lt = (0.5 * torch.randn(D, D, generator=gen, dtype=F64) for _ in range(2))
    k = 0.6 * torch.randn(D, D, generator=gen, dtype=F64)

    def G(t):
        return torch.linalg.matrix_exp(torch.sin(math.pi * t / T)[:, None, None] * k)

    def G_dot(t):
        return (math.pi / T * torch.cos(math.pi * t / T))[:, None, None] * k @ G(t)

    w2, lam2, lt2 = cubic_gauge_transform(w, lam, lt, T0, G, G_dot)
    wq, wk, wv = attention_from_cubic(w, lam, lt, T0, T)
    wq2, wk2, wv2 = attention_from_cubic(w2, lam2, lt2, T0, T)
    A = torch.linalg.inv(G(torch.tensor([T0], dtype=F64))[0]).T
    assert float((wq2 - wq @ A).abs().max()) < 1e-9
    assert float((wk2 - wk @ torch.linalg.inv(A).T).abs().max()) < 1e-9
    assert float((wv2 - wv).abs().max()) < 1e-9
    assert float((wq2 - wq).abs().max()) > 1e-2  # and it is not the identity
    # the integrated flows agree too (G(0) = G(T) = 1)
    # the integrated flows agree too (G(0) = G(T) = 1) as σ → 0: λ' uses G(t₀) for G(t)
    x = torch.randn(3, D, generator=gen, dtype=F64)
    gaps = []
    for sigma in (1e-3, 1e-4):
        with torch.no_grad():
            y1 = CubicNODE.instantaneous(w, lam, lt, T0, T, sigma)(x, 0.1)
            y2 = CubicNODE.instantaneous(w2, lam2, lt2, T0, T, sigma)(x, 0.1)
        gaps.append(float((y1 - y2).abs().max()))
    assert gaps[1] < gaps[0] / 5 and gaps[1] < 1e-4, gaps
    # the α part: λ ↦ λ/α, λ̃ ↦ α λ̃
    wq3, wk3, wv3 = attention_from_cubic(w, *alpha_redundancy(lam, lt, 2.5), T0, T)
    assert float((wq3 - wq).abs().max()) < 1e-12
    assert float((wk3 - 2.5 * wk).abs().max()) < 1e-12
    assert float((wv3 - wv / 2.5).abs().max()) < 1e-12


def test_bad_inputs(gen):
    lam = torch.eye(D, dtype=F64)

    def w(t):
        return torch.eye(D, dtype=F64).expand(len(t), D, D)  # holonomy e^T ≠ 1

    with pytest.raises(gaugenet.GaugeError, match="holonomy"):
        attention_from_cubic(w, lam, lam, T0, T)
    with pytest.raises(gaugenet.GaugeError, match="inside"):
        CubicNODE.instantaneous(w, lam, lam, 0.001, T, 1e-3)
    with pytest.raises(gaugenet.GaugeError, match="positive"):
        CubicNODE(w, lambda t: t, -1.0)
    with pytest.raises(gaugenet.GaugeError, match=r"\(d, d\)"):
        attention_from_cubic(w, torch.ones(D, D + 1, dtype=F64), lam, T0, T)
    with pytest.raises(gaugenet.GaugeError, match="outside"):
        first_order_kernel(CubicNODE.instantaneous(w, lam, lam, T0, T, 1e-3), 2 * T)
