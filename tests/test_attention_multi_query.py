"""Multi-query attention whose one key-value head reaches the query heads by broadcasting
in `scaled_dot_product_attention` (keys and values `(batch, 1, tokens, dh)`, no
`enable_gqa`; Falcon's layout): one key-value group shared by every query head, as with
`enable_gqa`, and the group is complete."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugenet
from gaugenet.groups._algebra import AlgebraFactor

F64 = torch.float64
D, H, DH, T = 6, 3, 2, 5


class MultiQuery(nn.Module):
    """`H` query heads of size `DH`, one key and one value head, causal; `gqa` repeats the
    key-value head with `enable_gqa` instead of broadcasting it."""

    def __init__(self, gqa: bool = False) -> None:
        super().__init__()
        self.gqa = gqa
        self.q, self.v = nn.Linear(D, H * DH), nn.Linear(D, DH)
        self.k = nn.Linear(D, DH, bias=False)  # a key bias only shifts every score equally
        self.o = nn.Linear(H * DH, D)

    def forward(self, x: Tensor) -> Tensor:
        q = self.q(x).reshape(-1, T, H, DH).transpose(1, 2)
        k, v = (m(x).reshape(-1, T, 1, DH).transpose(1, 2) for m in (self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        return self.o(a.transpose(1, 2).reshape(-1, T, H * DH))


def _model(gqa: bool = False) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    x = torch.randn(40, T, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    return MultiQuery(gqa).to(F64), x


def _qk(group: gaugenet.GaugeGroup) -> AlgebraFactor:
    (qk,) = [f for f in group.factors if isinstance(f, AlgebraFactor) and f.name.endswith("qk")]
    return qk


def test_broadcast_key_value_head_gives_one_group_and_a_complete_group() -> None:
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    assert not any("attention pattern not analyzed" in b.reason for b in group.breakers)
    assert _qk(group).dim == DH * DH  # one group: the key head's GL(DH)
    assert group.dim == gaugenet.symmetries(*_model(gqa=True)).dim  # as with enable_gqa
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete", report  # dim = n − rank J
    assert report.worst_residual < 1e-12
    for seed in (2, 3):
        moved = group.act(model, group.sample(torch.Generator().manual_seed(seed)))
        assert gaugenet.invariance_error(model, moved, x) < 1e-12
        assert not torch.allclose(moved.k.weight, model.k.weight)


@pytest.mark.parametrize("head", [0, 1])
def test_one_query_head_turned_alone_changes_the_outputs(head: int) -> None:
    """The query-key element on one query head only (the others and the key as they
    were): the shared key head cannot follow, the scores change."""
    model, x = _model()
    g = _qk(gaugenet.symmetries(model, x)).sample(torch.Generator().manual_seed(4))
    wrong, _ = _model()
    rows = slice(head * DH, (head + 1) * DH)
    with torch.no_grad():
        wrong.q.weight[rows] = g.reshape(DH, DH).T @ model.q.weight[rows]
        wrong.q.bias[rows] = g.reshape(DH, DH).T @ model.q.bias[rows]
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3
