"""The numpy shortcuts of a single Wilson line's bookkeeping: node times, the first step
count and RK8's field size agree with the torch computations they replace."""

from __future__ import annotations

import math

import pytest
import torch

from gaugenet.ode import Magnus4, Magnus6, wilson_line
from gaugenet.ode import _magnus_steps as fixed
from gaugenet.ode._magnus_search import first_steps
from gaugenet.ode._rk import _field_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_node_times_numpy_matches_torch_bitwise(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(0)
    for B in (1, 3):
        for n in (1, 2, 3, 7, 64):
            for method in (Magnus6(), Magnus4()):
                t0 = torch.randn(B, dtype=dtype, generator=gen) * 10
                t1 = t0 + torch.rand(B, dtype=dtype, generator=gen) * 3 - 1
                fast = fixed.node_times(t1, t0, n, method)
                with monkeypatch.context() as m:
                    m.setattr(fixed, "NUMPY_TIMES", 0)  # the torch kernels
                    slow = fixed.node_times(t1, t0, n, method)
                assert fast.dtype == slow.dtype == dtype
                assert torch.equal(fast, slow)


def test_node_times_keep_the_graph_to_the_end_points():
    t0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    t1 = torch.ones(1, dtype=torch.float64)
    times = fixed.node_times(t1, t0, 2, Magnus6())
    assert times.requires_grad  # (numpy would have cut it)
    (g,) = torch.autograd.grad(times.sum(), t0)
    # Each time is t0 + (k + c)(t1 - t0)/n, so d/dt0 = 1 - (k + c)/n; over k = 0, 1 and the
    # three nodes (summing to 3/2): 6 - (3 · 1 + 2 · 3/2)/2 = 3.
    assert float(g) == pytest.approx(3.0)


def test_node_times_numpy_only_for_few_times(monkeypatch):
    calls = []
    real = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: calls.append(a.size) or real(a))
    t0, t1 = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    fixed.node_times(t1, t0, 4, Magnus6())
    assert calls == [12]
    fixed.node_times(t1, t0, fixed.NUMPY_TIMES, Magnus6())  # 3x more times than the cap
    assert calls == [12]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_steps_single_line_matches_batched(dtype):
    gen = torch.Generator().manual_seed(1)
    for scale in (0.01, 1.0, 30.0):
        A0 = torch.randn(1, 2, 8, 8, dtype=dtype, generator=gen) * scale
        L = torch.tensor([-0.7], dtype=dtype)
        for rtol in (1e-4, 1e-8, 1e-12):
            # The batched (torch) computation: the same interval twice.
            assert first_steps(A0, L, rtol) == first_steps(A0.repeat(2, 1, 1, 1), L.repeat(2), rtol)


def test_first_steps_single_line_not_finite():
    A0 = torch.ones(1, 4, 4, dtype=torch.float64)
    A0[0, 1, 2] = math.nan
    assert first_steps(A0, torch.ones(1, dtype=torch.float64), 1e-6) == 4
    A0[0, 1, 2] = math.inf
    assert first_steps(A0, torch.ones(1, dtype=torch.float64), 1e-6) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_field_size_single_line_matches_batched(dtype):
    gen = torch.Generator().manual_seed(2)
    for scale in (0.1, 5.0):
        K0 = torch.randn(1, 16, 16, dtype=dtype, generator=gen) * scale
        one = _field_size(K0)
        two = _field_size(torch.cat([K0, 0.5 * K0]))  # (2 lines: the torch kernels)
        assert one == pytest.approx(two, rel=1e-6 if dtype == torch.float32 else 1e-14)
    K0[0, 3, 3] = math.nan
    assert math.isnan(_field_size(K0))


def test_rtol_search_returns_an_ordinary_tensor_and_w_makes_ordinary_tensors():
    """The search without a graph runs in inference mode: neither the line nor what `w`
    keeps may be an inference tensor (either would fail in a later autograd graph)."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(2, 6, 6, dtype=torch.float64, generator=gen)
    kept = []

    def w(t: torch.Tensor) -> torch.Tensor:
        kept.append(torch.sin(t))  # a field that keeps what it computes
        return A[0] + kept[-1][:, None, None] * A[1]

    W = wilson_line(w, 1.0, 0.0, rtol=1e-8)
    assert not W.is_inference() and not any(k.is_inference() for k in kept)
    p = torch.ones(6, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((W @ p).pow(2).sum() + (kept[-1] * p.sum()).sum(), p)
    assert torch.isfinite(g).all()
    W[0, 0] += 1.0  # in place outside inference mode: an inference tensor would raise
    # The same line as with gradients enabled through w (the search with a graph).
    B = A.clone().requires_grad_(True)
    ref = wilson_line(lambda t: B[0] + torch.sin(t)[:, None, None] * B[1], 1.0, 0.0, rtol=1e-8)
    assert ref.requires_grad
    W[0, 0] -= 1.0
    assert torch.allclose(W, ref.detach(), rtol=0, atol=1e-14)


def test_inference_tensors_would_fail_later():
    """Why the copy and the wrapper matter: outside inference mode an inference tensor
    cannot be updated in place (as the line is above) nor saved for a backward pass."""
    with torch.inference_mode():
        X = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        X.add_(1.0)
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors cannot be saved"):
        torch.mul(p, X).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relative_gap_numpy_matches_torch(monkeypatch, dtype):
    from gaugenet.ode import _magnus_search as search

    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 2, 5, 5, dtype=dtype, generator=gen)
    b = a + 1e-3 * torch.randn(3, 2, 5, 5, dtype=dtype, generator=gen)
    b[1] *= 100.0  # the largest relative gap is in another line than the largest entries
    fast = search.relative_gap(a, b)
    with monkeypatch.context() as m:
        m.setattr(search, "NUMPY_GAP", 0)  # the torch kernels
        slow = search.relative_gap(a, b)
    assert fast == pytest.approx(slow, rel=1e-6 if dtype == torch.float32 else 1e-15)
    assert search.relative_gap(a[:0], b[:0]) == 0.0
    b[2, 1, 3, 3] = math.nan
    assert math.isnan(search.relative_gap(a, b))  # (not a gap below any tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_doubling_pair_numpy_times_give_the_same_lines(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(2, 5, 5, dtype=dtype, generator=gen)

    def w(t: torch.Tensor) -> torch.Tensor:
        return A[0] + torch.cos(3 * t)[:, None, None] * A[1]

    t0 = torch.tensor([0.1, -0.3], dtype=dtype)
    t1 = torch.tensor([0.9, 0.35], dtype=dtype)
    fast = fixed.doubling_pair(w, t1, t0, 3, Magnus6(), None)
    with monkeypatch.context() as m:
        m.setattr(fixed, "NUMPY_TIMES", 0)  # the torch kernels
        slow = fixed.doubling_pair(w, t1, t0, 3, Magnus6(), None)
    assert all(torch.equal(x, y) for x, y in zip(fast, slow))
    # Negative: a half-way point off by one unit of roundoff changes the fine line.
    mid = 0.5 * (t0 + t1)
    off = torch.nextafter(mid, torch.full_like(mid, math.inf))
    fine = fixed.fixed_steps(w, off, t0, 3, Magnus6())
    other = fixed.fixed_steps(w, t1, off, 3, Magnus6())
    assert not torch.equal(other @ fine, fast[1])


def test_numpy_shortcuts_take_lazily_negated_tensors():
    """(`Tensor.numpy` refuses a tensor with its negative bit set: the shortcuts resolve it.)"""
    from gaugenet.ode import _magnus_search as search

    t = torch._neg_view(torch.tensor([0.5], dtype=torch.float64))
    assert t.is_neg()
    times = fixed.node_times(torch.ones(1, dtype=torch.float64), t, 2, Magnus6())
    assert times.shape == (6,) and float(times.min()) > -0.5
    b = torch._neg_view(torch.ones(1, 3, 3, dtype=torch.float64))
    assert search.relative_gap(torch.zeros(1, 3, 3, dtype=torch.float64), b) == 1.0
