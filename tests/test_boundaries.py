"""Boundary and invertibility conditions are refused, saying what and where; valid ones pass."""

from __future__ import annotations

import math

import pytest
import torch

from gaugenet import GaugeError
from gaugenet.ode import (
    Chebyshev,
    LinearNODE,
    MLPField,
    NeuralODE,
    SpacetimeDiffeo,
    SpatialDiffeo,
    TimePath,
    random_gauge_path,
    random_generator,
    random_linear,
    random_time_shift,
)
from gaugenet.ode._gl_plus import gl_plus_violation

F64 = torch.float64


@pytest.fixture
def node() -> LinearNODE:
    gen = torch.Generator().manual_seed(3)
    w = Chebyshev.random((3, 3), 4, 1.0, scale=0.8, generator=gen)
    return LinearNODE(w, Chebyshev.random((3,), 3, 1.0, generator=gen), 1.0)


def _double_root(p: float = 1.3):
    """`G = 1 + ½ sin(π t^p) diag(−2, 0, 0)`: `det G = 1 − sin(π t^p) ≥ 0`, a double root at
    `t = 2^(−1/p)`, between the points of any uniform grid; `G(0) = G(1) = 1`."""
    M = torch.diag(torch.tensor([-2.0, 0.0, 0.0], dtype=F64))

    def G(t):
        return torch.eye(3, dtype=F64) + 0.5 * torch.sin(math.pi * t**p)[..., None, None] * M

    return G, 0.5 ** (1 / p)


def test_double_root_of_det_is_refused(node):
    G, root = _double_root()
    with pytest.raises(GaugeError, match=r"GL⁺.*t = 0\.586"):
        node.gauge_transform(TimePath(G, vectorized=True))
    found = gl_plus_violation(G, 1.0, F64)
    assert found is not None and abs(found.t - root) < 1e-6 and found.ratio < 1e-8


def test_sign_change_between_grid_points_is_located(node):
    # det G = 1 − 2 sin(πt): two simple roots, at t = 1/6 and 5/6; the first one is named
    def G(t):
        s = 1 - 2 * torch.sin(math.pi * t)
        return torch.diag_embed(torch.stack([s, torch.ones_like(s), torch.ones_like(s)], -1))

    with pytest.raises(GaugeError, match=r"changes sign at t = 0\.16666"):
        node.gauge_transform(TimePath(G, vectorized=True))


def test_double_root_refused_by_linear_diffeo():
    G, _ = _double_root()
    with pytest.raises(GaugeError, match=r"not invertible.*t = 0\.586"):
        SpatialDiffeo.linear(G, lambda t: torch.zeros(3, dtype=F64) + 0 * t, 1.0)


def test_valid_paths_still_pass(node):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, dtype=F64, generator=gen)
    for _ in range(3):
        G, c = random_gauge_path(3, scale=0.8, generator=gen)
        new = node.gauge_transform(G, c)
        with torch.no_grad():
            assert (new(x) - node(x)).abs().max() < 1e-10
    # a path with a deep but nonzero dip of det G (condition number about 1e4) is valid
    M = torch.diag(torch.tensor([-2.0, 0.0, 0.0], dtype=F64))

    def G_dip(t):
        return torch.eye(3, dtype=F64) + 0.49995 * torch.sin(math.pi * t)[..., None, None] * M

    assert gl_plus_violation(G_dip, 1.0, F64) is None
    assert random_linear(3, generator=gen) is not None


def test_spatial_map_moving_the_end_is_refused():
    gen = torch.Generator().manual_seed(2)
    ode = NeuralODE(MLPField(2, 8, generator=gen), 1.0, rtol=1e-9, atol=1e-9)
    x0 = torch.randn(6, 2, dtype=F64, generator=gen)
    shift = SpatialDiffeo(lambda t, x: x + t, lambda t, x: x - t, 1.0, check_boundary=False)
    with torch.no_grad():
        assert (ode.pullback(shift)(x0) - ode(x0)).abs().max() > 0.5  # why it must be refused
    phi = SpatialDiffeo(lambda t, x: x + t, lambda t, x: x - t, 1.0)
    with pytest.raises(GaugeError, match=r"identity at t = T = 1.*moves x = .* by 1\.000e\+00"):
        ode.pullback(phi)(x0)
    with pytest.raises(GaugeError, match="identity at t = 0"):
        SpatialDiffeo(lambda t, x: 1.01 * x, lambda t, x: x / 1.01, 1.0, d=2)
    # inside a spacetime diffeomorphism the spatial part is evaluated row by row under vmap
    general = SpacetimeDiffeo(phi, random_time_shift(2, generator=gen))
    with pytest.raises(GaugeError, match="identity at t = T"):
        general.pullback_field(ode.field)(torch.zeros((), dtype=F64), x0)
    # a map that is the identity only near the origin is caught at the random points
    with pytest.raises(GaugeError, match="t = T"):
        SpatialDiffeo(lambda t, x: x + t * torch.relu(x.abs() - 2.5), lambda t, x: x, 1.0, d=2)


def test_valid_spatial_maps_pass():
    gen = torch.Generator().manual_seed(4)
    ode = NeuralODE(MLPField(2, 8, generator=gen), 1.0, rtol=1e-8, atol=1e-8)
    x0 = torch.randn(5, 2, dtype=F64, generator=gen)
    window = lambda t: torch.sin(math.pi * t) ** 2  # noqa: E731
    phi = SpatialDiffeo(lambda t, x: x + window(t) * torch.tanh(x) / 4, lambda t, x: x, 1.0, d=2)
    batched = SpatialDiffeo.from_generator(
        random_generator(2, batch=5, generator=gen), 1.0, n_steps=2
    )
    with torch.no_grad():
        assert (ode.pullback(phi)(x0) - ode(x0)).abs().max() < 1e-7
    batched.check_boundary(x0)  # row-wise maps are probed row-wise: passes
    phi.check_boundary(x0.float())  # float32: its own tolerance
