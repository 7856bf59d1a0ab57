"""Gauge fixing by optimization reaches the straight-line gauge without moving x(T)."""

from __future__ import annotations

import math

import pytest
import torch

import gaugenet
from gaugenet.ode import Chebyshev, GaugePath, LinearNODE, fix_gauge, gauge_fixing_regularizer

D64 = torch.float64


def _node(gen, d):
    w = Chebyshev(0.3 * torch.randn(3, d, d, dtype=D64, generator=gen) / math.sqrt(d))
    b = Chebyshev(0.3 * torch.randn(3, d, dtype=D64, generator=gen))
    return LinearNODE(w, b, 1.0)


@pytest.mark.parametrize("d", [3, 8])
def test_fix_gauge_reaches_straight_line_gauge(gen, d):
    node = _node(gen, d)
    probe = torch.randn(3, d, dtype=D64, generator=gen)
    res = fix_gauge(
        node, lambda n: gauge_fixing_regularizer(n, order=8), modes=5, iterations=3, probe=probe
    )
    assert res.values[-1] < 1e-4 * res.values[0]
    assert max(res.output_drift) < 1e-9  # x(T) unchanged at every iteration
    straight, _ = node.to_straight_line_gauge()
    ts = torch.linspace(0, 1, 17, dtype=D64)
    with torch.no_grad():
        err = (res.node.w(ts) - straight.w(ts)).norm() / straight.w(ts).norm()
        start = (node.w(ts) - straight.w(ts)).norm() / straight.w(ts).norm()
    assert float(err) < 1e-3
    assert float(start) > 1e-2  # negative: the starting gauge is far from it


def test_gauge_path_boundaries_and_derivative(gen):
    p = GaugePath(3, 2.0, modes=4)
    with torch.no_grad():
        p.A.normal_(generator=gen)
        p.C.normal_(generator=gen)
    ends = torch.tensor([0.0, 2.0], dtype=D64)
    torch.testing.assert_close(p.G(ends), torch.eye(3, dtype=D64).expand(2, 3, 3))
    torch.testing.assert_close(p.c(ends), torch.zeros(2, 3, dtype=D64))
    t = torch.tensor([0.3, 1.1], dtype=D64)
    h = 1e-6
    fd = (p.G(t + h) - p.G(t - h)) / (2 * h)
    torch.testing.assert_close(p.G_dot(t), fd, rtol=1e-6, atol=1e-8)
    fdc = (p.c(t + h) - p.c(t - h)) / (2 * h)
    torch.testing.assert_close(p.c_dot(t), fdc, rtol=1e-6, atol=1e-8)
    with pytest.raises(gaugenet.GaugeError):
        fix_gauge(_node(gen, 2), gauge_fixing_regularizer, iterations=-1)
