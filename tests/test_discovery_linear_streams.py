"""Linear residual streams (`discovery/_linear_streams.py`, `groups/_linear_stream.py`): the
`GL(c)` of a stream written by convolutions with BatchNorm and read by convolutions, and the
writers' shifts taken back by 1×1 readers. Checked element by element in float64 and
float32, against the Jacobian (tangents in its kernel, the dimension `n − rank J`), with the
group's composition law, against elements outside the group, and refused where the stream is
read by a nonlinearity."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import gaugenet
from gaugenet.certify import functional_dimension
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.discovery.rules.patterns import _Bottleneck
from gaugenet.groups import GaugeGroup
from gaugenet.groups._linear_stream import LinearStreamFactor
from gaugenet.groups._matrix import random_gl

X = torch.randn(24, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Bottleneck().double().eval()


def _err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _stream(group: GaugeGroup) -> tuple[LinearStreamFactor, list]:
    (gl,) = [f for f in group.factors if isinstance(f, LinearStreamFactor)]
    shifts = [f for f in group.factors if f.name.startswith("stream_shift:")]
    return gl, shifts


def test_found_with_the_jacobian_dimension() -> None:
    model = _model()
    group = gaugenet.symmetries(model, X)
    gl, shifts = _stream(group)
    assert gl.dim == 9 and sorted(f.name for f in shifts) == [
        "stream_shift:bn0",
        "stream_shift:bn1",
    ]
    fd = functional_dimension(model, (X,))
    assert fd.n_params - fd.rank == group.dim == 29


def test_random_elements_keep_the_outputs_float64_and_float32() -> None:
    model = _model()
    group = gaugenet.symmetries(model, X)
    gl, shifts = _stream(group)
    gen = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m, x = copy.deepcopy(model).to(dtype), X.to(dtype)
        g = {gl.name: gl.sample(gen, dtype)}
        g.update({f.name: f.sample(gen, dtype, scale=2.0) for f in shifts})
        moved = group.act(m, g)
        with torch.no_grad():
            assert _err(moved(x), m(x)) < tol
            assert float((moved.stem.weight - m.stem.weight).abs().max()) > 0.05


def test_tangents_in_the_kernel_of_the_jacobian() -> None:
    model = _model()
    group = gaugenet.symmetries(model, X)
    gl, shifts = _stream(group)
    fm = flat_model(model, (X,))
    jac = jacobian_of(fm)
    t = GaugeGroup((gl, *shifts), (), group.param_names).tangent(model)
    assert t.shape[0] == 15 and torch.linalg.matrix_rank(t) == 15
    assert float((jac @ t.T).norm()) < 1e-10 * float(jac.norm()) * float(t.norm())


def test_composition_law() -> None:
    """`act(act(m, g), h) == act(m, compose(g, h))`, the shifts moved by the `GL`."""
    model = _model()
    group = gaugenet.symmetries(model, X)
    gen = torch.Generator().manual_seed(2)
    g, h = group.sample(gen), group.sample(gen)
    a = group.act(group.act(model, g), h)
    b = group.act(model, group.compose(g, h))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10), name


def test_plain_gl_on_the_writers_changes_the_outputs() -> None:
    """Outside the group: `W ↦ G⁻¹ W` on the BatchNorm writers' convolutions (without the
    conjugation by `γ / σ` and the moved `β`) and `V ↦ V G` on the readers."""
    model = _model()
    g = random_gl(1, 3, generator=torch.Generator().manual_seed(4))[0]
    ginv = torch.linalg.inv(g)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        for conv in (bad.stem, bad.project):
            conv.weight.copy_(torch.einsum("ij,j...->i...", ginv, conv.weight))
        for conv in (bad.expand, bad.head):
            conv.weight.copy_(torch.einsum("oj...,ji->oi...", conv.weight, g))
        assert _err(bad(X), model(X)) > 1e-2


class _ReadByReLU(_Bottleneck):
    """The stream goes through a ReLU before the head: its basis is seen."""

    def forward(self, x: Tensor) -> Tensor:
        s = self.bn0(self.stem(x))
        s = s + self.bn1(self.project(torch.relu(self.bn_e(self.expand(s)))))
        return self.head(torch.relu(s))


def test_no_gl_when_a_nonlinearity_reads_the_stream() -> None:
    """The ReLU sees the sum: no `GL`, and each writer's shift alone would change it; the
    two shifts opposite (`+v` on the stem's `β`, `−v` on the projection's, the expansion
    taking `+v` back) keep it: one factor of 3."""
    torch.manual_seed(0)
    model = _ReadByReLU().double().eval()
    group = gaugenet.symmetries(model, X)
    assert not [f for f in group.factors if isinstance(f, LinearStreamFactor)]
    (shift,) = [f for f in group.factors if f.name.startswith("stream_shift:")]
    assert sorted(k for _, k in shift.terms[0].writers) == [-1.0, 1.0]
    fd = functional_dimension(model, (X,))
    assert fd.n_params - fd.rank == group.dim
    v = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _err(group.act(model, {shift.name: v})(X), model(X)) < 1e-12
        one = copy.deepcopy(model)
        one.bn0.bias.add_(v)  # the stem's shift alone
        assert _err(one(X), model(X)) > 1e-3


def test_canonicalize_keeps_the_function() -> None:
    """The stream's `GL` has no canonical form yet (left where it is); the rest is
    canonicalized, the BatchNorm writers' row scales anchored on their `γ`."""
    model = _model()
    out = gaugenet.canonicalize(model, example_inputs=X)
    with torch.no_grad():
        assert _err(out(X), model(X)) < 1e-10
        assert torch.allclose(out.bn0.weight.abs(), torch.ones(3, dtype=torch.float64))
