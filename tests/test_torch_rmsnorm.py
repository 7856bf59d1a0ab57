"""torch's own `nn.RMSNorm` (one `F.rms_norm` call in both captures) is analyzed as the
operations it computes (`_rms_norm.py`): the same group as an RMSNorm written out, the
residual-stream rotation included, every tangent in the Jacobian's kernel; a rotation of the
stream that skips the gain's conjugation changes the outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._rms_norm import expand_rms_norms
from gaugenet.groups import OrthogonalFactor

F64 = torch.float64


class WrittenOut(nn.Module):
    def __init__(self, d: int, eps: float | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=F64))
        self.eps = torch.finfo(F64).eps if eps is None else eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """Token table (24 × 8), one residual MLP block read through a norm, a final norm and a
    linear head."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.emb = nn.Embedding(24, 8, dtype=F64)
        self.n1, self.n2 = norm(), norm()
        self.up, self.down = nn.Linear(8, 16, dtype=F64), nn.Linear(16, 8, dtype=F64)
        self.head = nn.Linear(8, 5, dtype=F64)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        x = x + self.down(torch.relu(self.up(self.n1(x))))
        return self.head(self.n2(x))


def _model(norm) -> Block:
    torch.manual_seed(0)
    m = Block(norm).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return m


IDS = torch.arange(24).repeat(4).reshape(16, 6)


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_torch_rmsnorm_gets_the_written_out_group(eps: float | None) -> None:
    torch_norm = _model(lambda: nn.RMSNorm(8, eps=eps, dtype=F64))
    written = _model(lambda: WrittenOut(8, eps))
    group, want = gaugenet.symmetries(torch_norm, IDS), gaugenet.symmetries(written, IDS)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    assert sorted((f.kind, f.dim) for f in group.factors) == sorted(
        (f.kind, f.dim) for f in want.factors
    )
    rot = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    assert [f.dim for f in rot] == [28]  # O(8) of the stream
    # every orbit tangent in the Jacobian's kernel (the count itself is not measurable
    # here: the model reads each of its 24 tokens alone, a table of 24 input rows)
    report = gaugenet.certify(torch_norm, IDS, group=group)
    assert report.worst_residual < 1e-12 and report.act_error < 1e-12
    out, gen = torch_norm(IDS), torch.Generator().manual_seed(1)
    for _ in range(3):
        assert relative_error(group.act(torch_norm, group.sample(gen))(IDS), out) < 1e-12


def test_a_rotation_without_the_gain_changes_the_outputs() -> None:
    """Negative: turning the table, the writer and the readers by `Q` but leaving the
    readers' columns unconjugated by the gains changes the outputs."""
    model = _model(lambda: nn.RMSNorm(8, dtype=F64))
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2), dtype=F64))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.emb.weight.copy_(model.emb.weight @ q.T)
        moved.down.weight.copy_(q @ model.down.weight)
        moved.down.bias.copy_(q @ model.down.bias)
        moved.up.weight.copy_(model.up.weight @ q.T)
        moved.head.weight.copy_(model.head.weight @ q.T)
    assert relative_error(moved(IDS), model(IDS)) > 1e-3


class Functional(nn.Module):
    def __init__(self, eps: float | None) -> None:
        super().__init__()
        self.lin, self.eps = nn.Linear(4, 6, dtype=F64), eps
        self.w = nn.Parameter(torch.randn(6, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.rms_norm(self.lin(x), (6,), self.w, self.eps)


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_expansion_computes_rms_norm(eps: float | None) -> None:
    """The written-out graph computes what `F.rms_norm` computes."""
    model, x = Functional(eps), torch.randn(5, 4, dtype=F64)
    gm = torch.fx.symbolic_trace(model)
    assert expand_rms_norms(gm, model) == 1
    assert not any("rms_norm" in str(n.target) for n in gm.graph.nodes)
    assert torch.allclose(gm(x), model(x), rtol=1e-14, atol=1e-14)


class MeanNorm(nn.Module):
    """Not an RMS norm: `x · rsqrt(mean(x)² + 1) · γ` (the mean, not the square, of `x`),
    which no rotation of `x` keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.mean(-1, keepdim=True).pow(2) + 1.0) * self.weight


def test_a_norm_of_the_mean_gets_no_rotation() -> None:
    """Negative: a per-token factor computed from `mean(x)` rather than from `x²` is not an
    RMS normalization; the stream gets no rotation, and a rotation of it changes the
    outputs."""
    model = _model(MeanNorm)
    group = gaugenet.symmetries(model, IDS)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    assert not any(isinstance(f, OrthogonalFactor) for f in group.factors)
    rotating = _model(lambda: WrittenOut(8, 1e-6))
    rot = next(
        f for f in gaugenet.symmetries(rotating, IDS).factors if isinstance(f, OrthogonalFactor)
    )
    q = rot.sample(torch.Generator().manual_seed(3))
    moved = copy.deepcopy(model)
    moved.load_state_dict(rot.apply(dict(model.state_dict()), q))
    assert relative_error(moved(IDS), model(IDS)) > 1e-3
