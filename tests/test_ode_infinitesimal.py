"""Eq. (16) and (20): the pullback is `F + s δF + O(s²)`."""

from __future__ import annotations

import math

import torch

from gaugenet.ode import (
    MLPField,
    SpatialDiffeo,
    TimeReparam,
    TimeShift,
    lie_derivative,
    random_generator,
    time_shift_derivative,
)

F64 = torch.float64
SS = [1e-4, 1e-3, 1e-2, 1e-1]


def _points(d: int, gen: torch.Generator, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand((), dtype=F64, generator=gen), torch.randn(n, d, dtype=F64, generator=gen)


def _slope(errs: list[float]) -> float:
    xs = torch.log(torch.tensor(SS, dtype=F64))
    ys = torch.log(torch.tensor(errs, dtype=F64))
    xc = xs - xs.mean()
    return float((xc * (ys - ys.mean())).sum() / (xc * xc).sum())


def _check(field, pulled, delta, t, x) -> list[float]:
    with torch.no_grad():
        f, df = field(t, x), delta(t, x)
        assert df.abs().max() > 1e-2  # the deformation is not trivial
        return [(pulled(s)(t, x) - f - s * df).abs().max().item() for s in SS]


def test_lie_derivative_first_order(gen: torch.Generator) -> None:
    d = 3
    field = MLPField(d, 16, generator=gen)
    eps = random_generator(d, generator=gen)
    used = SpatialDiffeo.from_generator(eps, 1.0).generator  # windowed to vanish at the ends
    delta = lie_derivative(field, used)

    def pulled(s):
        return SpatialDiffeo.from_generator(lambda t, x: s * eps(t, x), 1.0).pullback_field(field)

    for _ in range(3):
        t, x = _points(d, gen)
        errs = _check(field, pulled, delta, t, x)
        assert abs(_slope(errs) - 2) < 0.2, errs
    # the wrong sign of the transport term is caught
    wrong = lie_derivative(field, lambda t, x: -used(t, x))
    assert _check(field, pulled, wrong, t, x)[0] > 1e-5


def test_time_reparam_first_order(gen: torch.Generator) -> None:
    d = 2
    field = MLPField(d, 16, generator=gen)

    def eps0_t(t):
        return t * (1 - t) * (1 + 2 * torch.sin(3 * t))

    delta = time_shift_derivative(field, lambda t, x: eps0_t(t).expand(x.shape[0]))

    def pulled(s):
        return TimeReparam(lambda t: t + s * eps0_t(t), 1.0).pullback_field(field)

    t, x = _points(d, gen)
    assert abs(_slope(_check(field, pulled, delta, t, x)) - 2) < 0.2


def test_space_dependent_time_shift_first_order(gen: torch.Generator) -> None:
    d = 2
    field = MLPField(d, 16, generator=gen)
    w = torch.randn(d, dtype=F64, generator=gen)

    def eps0(t, x):
        return torch.sin(x @ w + t)

    used = TimeShift(eps0, 1.0).shift
    delta = time_shift_derivative(field, used)

    def pulled(s):
        return TimeShift(lambda t, x: s * eps0(t, x), 1.0).pullback_field(field)

    t, x = _points(d, gen)
    errs = _check(field, pulled, delta, t, x)
    assert abs(_slope(errs) - 2) < 0.2, errs
    # dropping the x-dependent term (eq. 20 alone) leaves a first-order error
    t_only = time_shift_derivative(field, lambda tt, xx: used(tt, x))
    assert _check(field, pulled, t_only, t, x)[0] > 10 * errs[0] and math.isfinite(errs[0])
