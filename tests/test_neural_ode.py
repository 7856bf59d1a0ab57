"""NeuralODE: solutions, dtypes, batching, gradients, adjoint."""

from __future__ import annotations

import math

import pytest
import torch

from gaugenet import GaugeError
from gaugenet.ode import MLPField, NeuralODE, random_linear


def test_linear_field_matches_exponential() -> None:
    a = torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=torch.float64)
    node = NeuralODE(lambda t, x: x @ a.T, T=2.0, rtol=1e-11, atol=1e-11)
    x0 = torch.tensor([[1.0, 0.0], [0.3, -2.0]], dtype=torch.float64)
    exact = x0 @ torch.linalg.matrix_exp(2.0 * a).T
    assert (node(x0) - exact).abs().max() < 1e-9


def test_time_dependent_field_exact() -> None:
    # ẋ = cos(t) x  =>  x(T) = exp(sin T) x0
    node = NeuralODE(lambda t, x: torch.cos(t) * x, T=1.5, rtol=1e-11, atol=1e-11)
    x0 = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    assert (node(x0) - math.exp(math.sin(1.5)) * x0).abs().max() < 1e-9


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_dtypes_and_trajectory(gen: torch.Generator, dtype: torch.dtype, tol: float) -> None:
    field = MLPField(3, 8, dtype=dtype, generator=gen)
    node = NeuralODE(field, T=1.0, rtol=1e-6 if dtype == torch.float32 else 1e-11, atol=1e-9)
    x0 = torch.randn(5, 3, dtype=dtype, generator=gen)
    out = node(x0)
    assert out.dtype == dtype and out.shape == (5, 3)
    ts = torch.linspace(0.0, 1.0, 4, dtype=dtype)
    traj = node.trajectory(x0, ts)
    assert traj.shape == (4, 5, 3)
    assert (traj[0] - x0).abs().max() == 0
    assert (traj[-1] - out).abs().max() < tol
    # the flow moves the states: the check above is not vacuous
    assert (out - x0).abs().max() > 1e-2


def test_gradients_and_adjoint(gen: torch.Generator) -> None:
    field = MLPField(2, 8, generator=gen)
    x0 = torch.randn(4, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    grads = []
    for adjoint in (False, True):
        node = NeuralODE(field, 1.0, rtol=1e-10, atol=1e-10, adjoint=adjoint)
        field.zero_grad()
        (gx,) = torch.autograd.grad(node(x0).pow(2).sum(), x0)
        grads.append(gx)
    assert (grads[0] - grads[1]).abs().max() < 1e-7
    assert grads[0].abs().max() > 1e-3
    x = torch.randn(2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    node = NeuralODE(field, 0.5, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(node, (x,), atol=1e-6)


def test_bad_input() -> None:
    with pytest.raises(GaugeError, match="positive"):
        NeuralODE(lambda t, x: x, T=0.0)
    with pytest.raises(GaugeError, match="batch, d"):
        NeuralODE(lambda t, x: x)(torch.zeros(3, dtype=torch.float64))
    node = NeuralODE(lambda t, x: x, T=2.0)
    with pytest.raises(GaugeError, match="T = 1.0"):
        node.pullback(random_linear(2, T=1.0))
