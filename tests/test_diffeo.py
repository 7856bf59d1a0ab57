"""Theorem 2.1, sufficiency and necessity; the diffeomorphisms' own checks."""

from __future__ import annotations

import math

import pytest
import torch

from gaugenet import GaugeError
from gaugenet.ode import (
    MLPField,
    NeuralODE,
    SpacetimeDiffeo,
    SpatialDiffeo,
    TimeReparam,
    TimeShift,
    random_generator,
    random_linear,
    random_time_reparam,
    random_time_shift,
)

F64 = torch.float64
N_MAPS = 20  # independent random maps per check, one per row of the batch


def _node(d: int, gen: torch.Generator) -> NeuralODE:
    return NeuralODE(MLPField(d, 16, generator=gen), 1.0, rtol=1e-10, atol=1e-10)


def _spatial(kind: str, d: int, gen: torch.Generator) -> SpatialDiffeo:
    if kind == "generator":
        eps = random_generator(d, batch=N_MAPS, scale=0.5, generator=gen)
        return SpatialDiffeo.from_generator(eps, 1.0, n_steps=2)
    return random_linear(d, 1.0, batch=N_MAPS, generator=gen)


@pytest.mark.parametrize("d", [2, 8])
@pytest.mark.parametrize("kind", ["generator", "linear"])
def test_spatial_sufficiency(gen: torch.Generator, kind: str, d: int) -> None:
    node = _node(d, gen)
    phi = _spatial(kind, d, gen)
    x0 = torch.randn(N_MAPS, d, dtype=F64, generator=gen)
    new = node.pullback(phi)
    with torch.no_grad():
        err = (new(x0) - node(x0)).abs().max().item()
        # at an interior time the new state is φ_t⁻¹ of the old one, visibly different
        ts = torch.tensor([0.0, 0.5], dtype=F64)
        old_mid, new_mid = node.trajectory(x0, ts)[1], new.trajectory(x0, ts)[1]
    assert err < 1e-8
    assert (new_mid - old_mid).abs().max() > 1e-2
    assert (phi(ts[1], new_mid) - old_mid).abs().max() < 1e-8


@pytest.mark.parametrize("d", [2, 8])
def test_time_reparam_sufficiency(gen: torch.Generator, d: int) -> None:
    node = _node(d, gen)
    x0 = torch.randn(4, d, dtype=F64, generator=gen)
    with torch.no_grad():
        ref = node(x0)
        errs = [
            (node.pullback(random_time_reparam(generator=gen))(x0) - ref).abs().max().item()
            for _ in range(3)
        ]
    assert max(errs) < 1e-8


@pytest.mark.parametrize("d", [2, 8])
def test_time_shift_sufficiency(gen: torch.Generator, d: int) -> None:
    node = _node(d, gen)
    shift = random_time_shift(d, batch=N_MAPS, generator=gen)
    x0 = torch.randn(N_MAPS, d, dtype=F64, generator=gen)
    with torch.no_grad():
        err = (node.pullback(shift)(x0) - node(x0)).abs().max().item()
    assert err < 1e-8


def test_spacetime_composition(gen: torch.Generator) -> None:
    d = 2
    node = _node(d, gen)
    phi = random_linear(d, generator=gen)  # closed-form pullback keeps this test fast
    for time in (random_time_reparam(generator=gen), random_time_shift(d, generator=gen)):
        adm = SpacetimeDiffeo(phi, time)
        x0 = torch.randn(3, d, dtype=F64, generator=gen)
        new = node.pullback(adm)
        with torch.no_grad():
            assert (new(x0) - node(x0)).abs().max() < 1e-8
            # the new trajectory at t maps to the old one at the old time
            t = torch.tensor(0.4, dtype=F64)
            mid = new.trajectory(x0, torch.stack([t * 0, t]))[1]
            s, y = adm.spacetime(t, mid)
            old = torch.stack(
                [
                    node.trajectory(x0[i : i + 1], torch.stack([t * 0, si]))[1, 0]
                    for i, si in enumerate(s.expand(len(x0)))
                ]
            )
            assert (y - old).abs().max() < 1e-8
            t_back, x_back = adm.spacetime_inverse(s, y)
            assert (x_back - mid).abs().max() < 1e-10
            assert (t_back - t).abs().max() < 1e-10


@pytest.mark.parametrize("end", ["0", "T"])
def test_necessity(gen: torch.Generator, end: str) -> None:
    """A map that is not the identity at an end changes x(T), at first order as predicted."""
    d = 2
    node = _node(d, gen)
    base = random_generator(d, generator=gen)
    window = (lambda t: t) if end == "T" else (lambda t: 1 - t)
    x0 = torch.randn(8, d, dtype=F64, generator=gen)
    with torch.no_grad():
        out = node(x0)
    one = torch.ones((), dtype=F64)
    zero = torch.zeros((), dtype=F64)
    if end == "T":
        predicted = -base(one, out)  # x'(T) = φ_T⁻¹(x(T)) ≈ x(T) − s ε(T, x(T))
    else:  # x'(T) = Φ_T(φ_0(x0)) ≈ x(T) + s DΦ_T ε(0, x0)
        _, predicted = torch.autograd.functional.jvp(node, x0, base(zero, x0))
    residuals, changes = [], []
    ss = [1e-3, 1e-2]
    for s in ss:
        phi = SpatialDiffeo.from_generator(
            lambda t, x, s=s: s * window(t) * base(t, x), 1.0, n_steps=2, fix_boundary=False
        )
        with torch.no_grad():
            change = node.pullback(phi)(x0) - out
        changes.append(change.abs().max().item())
        residuals.append((change - s * predicted).abs().max().item())
    assert changes[0] > 1e-4  # it changes the output
    assert all(r < 1e-2 * c for r, c in zip(residuals, changes))  # first order matches
    slope = math.log(residuals[1] / residuals[0]) / math.log(ss[1] / ss[0])
    assert abs(slope - 2) < 0.2


def test_generator_forced_to_vanish(gen: torch.Generator) -> None:
    d = 3
    eps = random_generator(d, generator=gen)
    x = torch.randn(10, d, dtype=F64, generator=gen)
    zero, one = torch.zeros((), dtype=F64), torch.ones((), dtype=F64)
    assert eps(zero, x).abs().max() > 1e-2 and eps(one, x).abs().max() > 1e-2
    phi = SpatialDiffeo.from_generator(eps, 1.0)
    assert phi.boundary_error(x) == (0.0, 0.0)
    free = SpatialDiffeo.from_generator(eps, 1.0, fix_boundary=False)
    assert min(free.boundary_error(x)) > 1e-2
    t = torch.tensor(0.37, dtype=F64)
    assert (phi.inverse(t, phi(t, x)) - x).abs().max() < 1e-12
    assert (phi(t, x) - x).abs().max() > 1e-2


def test_linear_bad_input() -> None:
    d = 2
    eye = torch.eye(d, dtype=F64)
    M = torch.tensor([[0.0, 1.0], [0.5, 0.0]], dtype=F64)
    zero_c = lambda t: torch.zeros(d, dtype=F64)  # noqa: E731
    with pytest.raises(GaugeError, match=r"t = T = 1.*differs by 5\.000e-01"):
        SpatialDiffeo.linear(lambda t: eye + 0.5 * t * M / 0.5 * 0.5, zero_c, 1.0)
    with pytest.raises(GaugeError, match="c must vanish at t = 0"):
        SpatialDiffeo.linear(lambda t: eye, lambda t: torch.ones(d, dtype=F64) * (1 - t), 1.0)
    eye3 = torch.eye(3, dtype=F64)
    with pytest.raises(GaugeError, match="not invertible"):
        # det G(t) = (1 - 8 t (1 - t))³ changes sign: G passes through a singular matrix
        SpatialDiffeo.linear(
            lambda t: (1 - 8 * t * (1 - t)) * eye3, lambda t: t * (1 - t) * eye3[0], 1.0
        )
    with pytest.raises(GaugeError, match="not invertible.*t = 0.5"):
        # G(1/2) = diag(1, 0) exactly
        SpatialDiffeo.linear(
            lambda t: torch.diag(torch.stack([t * 0 + 1, 1 - 4 * t * (1 - t)])), zero_c, 1.0
        )
    ok = SpatialDiffeo.linear(lambda t: eye + t * (1 - t) * M, lambda t: t * (1 - t) * M[0], 1.0)
    assert (ok.G_dot(torch.tensor(0.0, dtype=F64)) - M).abs().max() < 1e-14


def test_time_bad_input() -> None:
    with pytest.raises(GaugeError, match="increasing"):
        TimeReparam(lambda t: t + 2.0 * t * (1 - t) * torch.sin(6 * t), 1.0)
    with pytest.raises(GaugeError, match="endpoint t = 1"):
        TimeReparam(lambda t: 0.9 * t, 1.0)
    with pytest.raises(GaugeError, match="increasing"):
        TimeReparam(lambda t: t**2, 1.0)  # τ'(0) = 0: not a diffeomorphism
    good = random_time_reparam()
    t = torch.linspace(0, 1, 7, dtype=F64)
    assert (good.inverse(good(t)) - t).abs().max() < 1e-12
    shift = TimeShift(lambda t, x: 0.1 * x.sum(-1) + t, 1.0)  # forced to vanish at the ends
    x = torch.randn(3, 2, dtype=F64)
    for end in (0.0, 1.0):
        s, _ = shift.spacetime(torch.tensor(end, dtype=F64), x)
        assert (s - end).abs().max() == 0
