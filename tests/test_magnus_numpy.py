"""Single-line Magnus steps on numpy (`_magnus_numpy`) give the torch path's line to rounding,
with the same step counts and error estimates; they run only without a graph through the
field, and bad fields keep their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaugenet import GaugeError
from gaugenet.ode import (
    Magnus4,
    Magnus6,
    _expm,
    _magnus_numpy,
    _magnus_search,
    _magnus_steps,
    wilson_line,
)
from gaugenet.ode._expm import expm
from wilson_fields import field, rel

F64 = torch.float64


@pytest.fixture
def calls(monkeypatch):
    """numpy measured faster (whatever this machine says), and its calls counted."""
    monkeypatch.setattr(_magnus_numpy, "faster_backend", lambda dtype, d: "numpy")
    count = []
    original = _magnus_steps.numpy_steps_product

    def spy(*args):
        count.append(1)
        return original(*args)

    monkeypatch.setattr(_magnus_steps, "numpy_steps_product", spy)
    return count


def torch_only(monkeypatch) -> None:
    monkeypatch.setattr(_magnus_steps, "numpy_steps", lambda A, h, method: False)


@pytest.mark.parametrize("method", [Magnus6(), Magnus4()])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_line_as_torch(calls, monkeypatch, method, dtype):
    gen = torch.Generator().manual_seed(3)
    w64 = field(16, gen)

    def w(t):
        return w64(t.double()).to(dtype)

    t1, t0 = torch.ones(1, dtype=dtype), torch.zeros(1, dtype=dtype)
    rtol = 1e-9 if dtype == torch.float64 else 1e-5
    W, err = wilson_line(w, t1, t0, rtol=rtol, method=method, return_error=True)
    fixed = wilson_line(w, t1, t0, steps=2, method=method)
    assert calls and W.dtype == dtype
    torch_only(monkeypatch)
    Wt, errt = wilson_line(w, t1, t0, rtol=rtol, method=method, return_error=True)
    fixedt = wilson_line(w, t1, t0, steps=2, method=method)
    unit = torch.finfo(dtype).eps
    assert rel(W, Wt) < 200 * unit and rel(fixed, fixedt) < 200 * unit
    assert abs(err - errt) <= 1e-3 * errt + 200 * unit
    # Negative: one step fewer is a different line, far beyond that tolerance.
    assert rel(wilson_line(w, t1, t0, steps=1, method=method), fixed) > 1e4 * unit


@pytest.mark.parametrize("X_scale", [1e-3, 0.3, 3.0, 40.0])
def test_numpy_expm_matches(X_scale):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(4, 16, 16, dtype=F64, generator=gen) * (X_scale / 4)
    for tol in (None, 1e-6, 1e-10):
        E = torch.from_numpy(_magnus_numpy.numpy_expm(X.numpy().copy(), tol))
        assert rel(E, expm(X, tol)) < 1e-13
        assert rel(E, torch.linalg.matrix_exp(X)) < max(tol or 0.0, 1e-13) * 1e3
    assert rel(torch.from_numpy(_magnus_numpy.numpy_expm(-X.numpy(), None)), expm(X)) > 1e-3


def test_not_used_with_a_graph(calls):
    gen = torch.Generator().manual_seed(4)
    base = field(16, gen)
    scale = torch.tensor(1.0, dtype=F64, requires_grad=True)

    def w(t):
        return scale * base(t)

    t1, t0 = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    W = wilson_line(w, t1, t0, rtol=1e-8)
    assert not calls and W.requires_grad
    (g,) = torch.autograd.grad(W.sum(), scale)
    # d/ds of the line at s = 1, by central differences with the fast path.
    eps = 1e-5
    with torch.no_grad():
        plus = wilson_line(lambda t: (1 + eps) * base(t), t1, t0, rtol=1e-11)
        minus = wilson_line(lambda t: (1 - eps) * base(t), t1, t0, rtol=1e-11)
    assert calls
    assert abs(float(g) - float((plus - minus).sum()) / (2 * eps)) < 1e-5 * abs(float(g))
    # Batches of many intervals and fields with extra axes keep the torch path.
    calls.clear()
    wilson_line(base, torch.linspace(0.1, 1, 8, dtype=F64), torch.zeros(8, dtype=F64), rtol=1e-8)
    assert not calls


def test_non_finite_field_raises(calls):
    gen = torch.Generator().manual_seed(5)
    base = field(16, gen)

    def w(t):
        out = base(t).clone()
        out[(t - 0.7).abs() < 0.2] = float("nan")
        return out

    t1, t0 = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    with pytest.raises(GaugeError, match="finite"):
        wilson_line(w, t1, t0, rtol=1e-8)
    with pytest.raises(GaugeError, match="finite"):
        wilson_line(w, t1, t0, steps=4)
    assert calls
    assert np.isnan(_magnus_numpy.numpy_expm(np.full((1, 2, 2), np.nan), None)).all()


def test_extrapolation_and_pair_product_on_numpy():
    gen = torch.Generator().manual_seed(6)
    fine, prev = torch.randn(2, 1, 16, 16, dtype=F64, generator=gen)
    out = _magnus_search.extrapolate(fine, prev, 63.0)
    assert torch.equal(out, fine + (fine - prev) / 63.0)
    assert not torch.equal(out, fine + (prev - fine) / 63.0)  # (negative: the sign matters)
    graph = fine.clone().requires_grad_()
    assert _magnus_search.extrapolate(graph, prev, 63.0).requires_grad
    w = field(8, gen)
    t1, t0 = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    coarse, paired = _magnus_steps.doubling_pair(w, t1, t0, 3, Magnus6(), None)
    assert rel(paired, wilson_line(w, t1, t0, steps=6)) < 1e-13
    assert rel(coarse, wilson_line(w, t1, t0, steps=3)) < 1e-13
    assert rel(paired, coarse) > 1e-8


def test_expm_plan_is_the_cheapest():
    """`expm_plan` (searched highest degree first, with pruning) equals the exhaustive pick:
    fewest products `cost + s` with the Taylor remainder within `tol`, ties to the higher
    degree, then fewer squarings."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n1 = float(10 ** rng.uniform(-4, 2))
        n2 = n1 * n1 * float(rng.uniform(0.05, 1.0))
        for tol in (2**-53, 1e-10, 1e-6, 1e-3):
            keys = [
                (cost + s, -m, s)
                for m, cost in _expm._COST.items()
                for s in range(_expm._MAX_SQUARINGS)
                if _expm._tail(m, n1, n2, 2.0**-s) <= tol
            ]
            best = min(keys)
            assert _expm.expm_plan(n1, n2, tol) == (-best[1], best[2])
    # Negative: a plan one squaring short of the pick leaves the remainder above tol.
    m, s = _expm.expm_plan(20.0, 300.0, 1e-10)
    assert s > 0 and _expm._tail(m, 20.0, 300.0, 2.0 ** -(s - 1)) > 1e-10
