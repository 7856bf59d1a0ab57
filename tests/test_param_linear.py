"""Linear maps written in `forward` on raw parameters, as papers write their networks.

`relu(x @ W1.T + b1) @ W2.T + b2` and its spellings (`torch.matmul`, `.t()`, `transpose`,
`permute`, `F.linear`, `torch.mm`, `torch.addmm`, `einsum`, weights stored `(in, out)` and
used as `x @ U`) had no rule: discovery returned an empty group and certify named all 10
hidden-unit rescalings "unexplained". `_param_linear.py` rewrites each to the one linear map
it computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugenet
from gaugenet.discovery._param_linear import _einsum_form

F64 = torch.float64


class _Raw(nn.Module):
    """Two layers, 6 → 10 → 5, `W` `(out, in)` and `U = Wᵀ` `(in, out)` of the same values."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(10, 6, generator=g, dtype=F64))
        self.b1 = nn.Parameter(torch.randn(10, generator=g, dtype=F64))
        self.w2 = nn.Parameter(torch.randn(5, 10, generator=g, dtype=F64))
        self.b2 = nn.Parameter(torch.randn(5, generator=g, dtype=F64))


FORMS = {
    "x @ W.T + b": lambda s, x: torch.relu(x @ s.w1.T + s.b1) @ s.w2.T + s.b2,
    "matmul .t()": lambda s, x: torch.matmul(
        torch.relu(torch.matmul(x, s.w1.t()) + s.b1), s.w2.t()
    ),
    "transpose, permute": lambda s, x: (
        torch.relu(x @ s.w1.transpose(0, 1) + s.b1) @ s.w2.permute(1, 0) + s.b2
    ),
    "mT, 3-D input": lambda s, x: torch.relu(x.reshape(8, 8, 6) @ s.w1.mT + s.b1) @ s.w2.mT,
    "F.linear": lambda s, x: F.linear(torch.relu(F.linear(x, s.w1, s.b1)), s.w2, s.b2),
    "mm, addmm": lambda s, x: torch.mm(torch.relu(torch.addmm(s.b1, x, s.w1.T)), s.w2.T),
    "einsum oi": lambda s, x: torch.einsum(
        "...i,oi->...o", torch.relu(torch.einsum("bi,oi->bo", x, s.w1) + s.b1), s.w2
    ),
}


class _InOut(nn.Module):
    """Weights stored `(in, out)`, used as `x @ U` and `einsum("bi,io->bo")`."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.u1 = nn.Parameter(torch.randn(6, 10, generator=g, dtype=F64))
        self.b1 = nn.Parameter(torch.randn(10, generator=g, dtype=F64))
        self.u2 = nn.Parameter(torch.randn(10, 5, generator=g, dtype=F64))

    def forward(self, x):
        return torch.einsum("bi,io->bo", torch.relu(x @ self.u1 + self.b1), self.u2)


def _model(form: str) -> nn.Module:
    if form == "x @ U, einsum io":
        return _InOut()
    return type("Raw", (_Raw,), {"forward": FORMS[form]})()


@pytest.mark.parametrize("form", [*FORMS, "x @ U, einsum io"])
def test_raw_parameter_layers_get_their_rescalings(form):
    model = _model(form)
    x = torch.randn(64, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    group = gaugenet.symmetries(model, x)
    assert sum(f.dim for f in group.factors if f.kind == "rescaling") == 10, group
    report = gaugenet.certify(model, x)
    assert report.unexplained == 0
    g = group.sample(torch.Generator().manual_seed(3))
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    # negative: the first layer's outputs rescaled without the second layer's compensation
    name = "u1" if form == "x @ U, einsum io" else "w1"
    wrong = group.act(model, g)
    with torch.no_grad():
        p = wrong.get_parameter(name)
        s = torch.linspace(0.5, 2.0, 10, dtype=F64)
        p.mul_(s if name == "u1" else s[:, None])
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3


def test_einsum_forms():
    assert _einsum_form("bi,oi->bo") == "oi"
    assert _einsum_form("...i,io->...o") == "io"
    assert _einsum_form("bti, oi -> bto") == "oi"
    assert _einsum_form("bi,oi->ob") is None  # outputs first: not a layer on the last axis
    assert _einsum_form("bi,bi->b") is None
    assert _einsum_form("ij,jk,kl->il") is None
    assert _einsum_form("bi,ii->bi") is None


class _Tied(nn.Module):
    """A character model whose output head is its embedding table, `h @ E.T`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 8, dtype=F64)
        self.pos = nn.Parameter(torch.randn(6, 8, dtype=F64))
        self.w = nn.Parameter(torch.randn(16, 8, dtype=F64))
        self.v = nn.Parameter(torch.randn(8, 16, dtype=F64))

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        h = h + torch.relu(h @ self.w.T) @ self.v.T
        return h @ self.emb.weight.T


def test_tied_head_written_in_forward():
    """The head reads the embedding's table, shared with the lookup: the 16 hidden units
    rescale and every factor found is exact. The residual stream's `O(8)` (28 directions)
    is found for `nn.Linear` readers, not yet for raw-parameter ones: certify names them."""
    model = _Tied()
    ids = torch.randint(0, 12, (32, 6), generator=torch.Generator().manual_seed(4))
    group = gaugenet.symmetries(model, ids)
    assert sum(f.dim for f in group.factors if f.kind == "rescaling") == 16
    g = group.sample(torch.Generator().manual_seed(5))
    assert gaugenet.invariance_error(model, group.act(model, g), ids) < 1e-12
    report = gaugenet.certify(model, ids)
    assert report.verdict != "wrong"
    assert report.unexplained <= 28
