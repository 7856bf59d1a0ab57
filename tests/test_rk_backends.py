"""RK8's single-line stages on numpy's BLAS (`NumpyStage`) compute the same lines as the torch
stages, to the declared tolerance and order; the backend is measured once per size, and
autograd, batches and bad input keep their paths and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gaugenet import GaugeError
from gaugenet.ode import RK8, Magnus6, _rk, _rk_backend, _rk_wilson, wilson_line
from gaugenet.ode._rk_numpy import NumpyStage
from wilson_fields import field, rel

F64 = torch.float64


@pytest.fixture
def built(monkeypatch):
    """Counts the `NumpyStage`s that `rk_lines` builds; small lines are not cut into pieces
    (which would make them a batch)."""
    count = []
    monkeypatch.setattr(_rk_wilson, "PIECES_MAX_DIM", 1)

    class Spy(NumpyStage):
        def __init__(self, *args):
            count.append(1)
            super().__init__(*args)

    monkeypatch.setattr(_rk, "NumpyStage", Spy)
    return count


def force(monkeypatch, backend: str) -> None:
    monkeypatch.setattr(_rk_backend, "faster_backend", lambda dtype, d: backend)


@pytest.mark.parametrize("d", [5, 64])
def test_numpy_stages_match_torch_stages_and_reference(d, gen, monkeypatch, built):
    w = field(d, gen, scale=2.0)
    ref = wilson_line(w, 1.0, 0.0, steps=400, method=Magnus6())
    lines = {}
    for backend in ("torch", "numpy"):
        force(monkeypatch, backend)
        lines[backend] = wilson_line(w, 1.0, 0.0, rtol=1e-10, method=RK8(), return_error=True)
        assert len(built) == (backend == "numpy")  # the path asked for is the one taken
    (Wt, est_t), (Wn, est_n) = lines["torch"], lines["numpy"]
    assert est_n <= 1e-10 and rel(Wn, ref) < 1e-9
    assert rel(Wn, Wt) < 1e-13 and math.isclose(est_n, est_t, rel_tol=1e-6)
    assert Wn.dtype == F64 and Wn.shape == (d, d)
    # Negative: the reversed interval's line is another one.
    back = wilson_line(w, 0.0, 1.0, rtol=1e-10, method=RK8())
    assert rel(back, Wn) > 1e-2 and rel(back @ Wn, torch.eye(d, dtype=F64)) < 1e-9


def test_numpy_stages_keep_the_declared_order(gen, monkeypatch, built):
    force(monkeypatch, "numpy")
    w = field(5, gen)
    ref = wilson_line(w, 1.0, 0.0, steps=400, method=Magnus6())
    ns = np.array([4, 5, 6, 8, 10])
    errs = np.array([rel(wilson_line(w, 1.0, 0.0, steps=int(n), method=RK8()), ref) for n in ns])
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert len(built) == len(ns) and abs(slope - RK8.order) < 0.5, (slope, errs)


def test_numpy_stages_in_float32_and_one_stage_at_a_time(gen, monkeypatch, built):
    force(monkeypatch, "numpy")
    w = field(6, gen)
    ref = wilson_line(w, 1.0, 0.0, steps=400, method=Magnus6())
    w32 = lambda t: w(t.double()).float()  # noqa: E731
    W32 = wilson_line(w32, torch.tensor(1.0), torch.tensor(0.0), rtol=1e-6, method=RK8())
    assert W32.dtype == torch.float32 and rel(W32.double(), ref) < 1e-5
    # A field too large for one call per step is evaluated stage by stage (`_Lazy`), and a
    # field handed back transposed (not contiguous) is read as it is.
    monkeypatch.setattr(_rk, "_ONE_CALL", 0)
    lazy = wilson_line(lambda t: w(t).mT.contiguous().mT, 1.0, 0.0, rtol=1e-10, method=RK8())
    assert rel(lazy, ref) < 1e-9 and len(built) == 2


def test_backend_is_measured_once_per_size_and_only_for_single_cpu_lines(gen, monkeypatch):
    first = _rk_backend.faster_backend(F64, 7)
    hits = _rk_backend.faster_backend.cache_info().hits
    assert _rk_backend.faster_backend(F64, 7) == first in ("numpy", "torch")
    assert _rk_backend.faster_backend.cache_info().hits == hits + 1
    force(monkeypatch, "numpy")
    one = torch.zeros(1, 4, 4, dtype=F64)
    assert _rk_backend.numpy_stages(one)
    assert not _rk_backend.numpy_stages(torch.zeros(2, 4, 4, dtype=F64))  # a batch
    assert not _rk_backend.numpy_stages(torch.zeros(1, 4, 4, dtype=torch.complex128))
    assert not _rk_backend.numpy_stages(torch.zeros(1, 4, 4, dtype=F64, device="meta"))
    force(monkeypatch, "torch")
    assert not _rk_backend.numpy_stages(one)
    # Sizes above TIMED_MAX_DIM take the choice timed there (a bounded one-time cost).
    asked = []
    monkeypatch.setattr(_rk_backend, "faster_backend", lambda dtype, d: asked.append(d) or "numpy")
    big = _rk_backend.TIMED_MAX_DIM + 3
    assert _rk_backend.numpy_stages(torch.zeros(1, big, big, dtype=torch.float32))
    assert _rk_backend.numpy_stages(one) and asked == [_rk_backend.TIMED_MAX_DIM, 4]


def test_autograd_keeps_the_torch_stages(gen, monkeypatch, built):
    force(monkeypatch, "numpy")
    A = torch.randn(2, 3, 3, dtype=F64, generator=gen, requires_grad=True)

    def w(t):
        return A[0] + t[:, None, None] * A[1]

    W = wilson_line(w, 1.0, 0.0, rtol=1e-8, method=RK8())
    W.sum().backward()
    assert not built and W.grad_fn is not None and float(A.grad.abs().sum()) > 0
    with torch.no_grad():  # without a graph the same field takes the numpy stages
        Wn = wilson_line(w, 1.0, 0.0, rtol=1e-8, method=RK8())
    assert len(built) == 1 and rel(Wn, W.detach()) < 1e-12


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_numpy_stages_raise_on_bad_fields_and_budgets(bad, gen, monkeypatch, built):
    force(monkeypatch, "numpy")
    w = field(4, gen)

    def poisoned(t):
        out = w(t)
        return torch.where(((t - 0.5).abs() < 0.05)[:, None, None], bad, out)

    with pytest.raises(GaugeError, match="not finite"):
        wilson_line(poisoned, 1.0, 0.0, rtol=1e-8, method=RK8())
    with pytest.raises(GaugeError, match="max_steps=3"):
        wilson_line(w, 1.0, 0.0, rtol=1e-12, max_steps=3, method=RK8())
    assert len(built) == 2
    # Positive: the same field away from the poison reaches its tolerance.
    W = wilson_line(poisoned, 0.3, 0.0, rtol=1e-8, method=RK8())
    assert rel(W, wilson_line(w, 0.3, 0.0, steps=64)) < 1e-7
