"""`GL` between a (transposed) convolution and the convolution reading it through a channel
concatenation (`discovery/_concat_gl.py`): found with the Jacobian's dimension, random
elements keep the outputs in float64 and float32, the tangents lie in ker J, an element
applied to the writer alone changes the outputs, and nothing is offered when a ReLU sits
between the concatenation and its reader."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import gaugenet
from gaugenet.certify import functional_dimension
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.discovery.rules.patterns import _UpConcat
from gaugenet.groups import GaugeGroup, GLFactor

X = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _model(cls: type[nn.Module] = _UpConcat) -> nn.Module:
    torch.manual_seed(0)
    return cls().double().eval()


def _err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _gl(group: GaugeGroup) -> list[GLFactor]:
    return [f for f in group.factors if isinstance(f, GLFactor)]


def test_found_with_the_jacobian_dimension() -> None:
    model = _model()
    group = gaugenet.symmetries(model, X)
    (f,) = _gl(group)
    assert f.name == "gl:up+dec" and f.dim == 4
    fd = functional_dimension(model, (X,))
    assert fd.n_params - fd.rank == group.dim == 6


def test_elements_keep_the_outputs_and_tangents_in_ker_j() -> None:
    model = _model()
    group = gaugenet.symmetries(model, X)
    (f,) = _gl(group)
    gen = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m, x = copy.deepcopy(model).to(dtype), X.to(dtype)
        moved = group.act(m, {f.name: f.sample(gen, dtype)})
        with torch.no_grad():
            assert _err(moved(x), m(x)) < tol
            assert float((moved.up.weight - m.up.weight).abs().max()) > 0.05
    jac = jacobian_of(flat_model(model, (X,)))
    t = GaugeGroup((f,), (), group.param_names).tangent(model)
    assert float((jac @ t.T).norm()) < 1e-10 * float(jac.norm()) * float(t.norm())


def test_the_writer_alone_changes_the_outputs() -> None:
    model = _model()
    group = gaugenet.symmetries(model, X)
    (f,) = _gl(group)
    g = f.sample(torch.Generator().manual_seed(2))
    moved = group.act(model, {f.name: g})
    half = copy.deepcopy(model)
    with torch.no_grad():
        half.up.weight.copy_(moved.up.weight)
        half.up.bias.copy_(moved.up.bias)  # the reader's columns left as they were
        assert _err(half(X), model(X)) > 1e-2


class _ReLUBetween(_UpConcat):
    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.enc(x))
        u = self.up(torch.nn.functional.max_pool2d(a, 2))
        return self.dec(torch.relu(torch.cat([u, a], 1)))


def test_not_offered_through_a_relu() -> None:
    model = _model(_ReLUBetween)
    assert not _gl(gaugenet.symmetries(model, X))
