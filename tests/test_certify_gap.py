"""`locate_gap`: the directions of `ker J` that are no orbit tangent, told apart as entries
never read on the inputs and directions located in parameters."""

from __future__ import annotations

import torch
from torch import nn

import gaugenet
from gaugenet.certify import certify, locate_gap
from gaugenet.certify._functional_dimension import rank_of
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.certify._orbit import orbit_projector
from gaugenet.groups import GaugeGroup


class _Net(nn.Module):
    """`lin2(relu(lin1(emb(ids) + x)))`: token rows plus a continuous input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.lin2 = nn.Linear(6, 2)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(self.emb(ids) + x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Net().double()


def _inputs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return ids, torch.randn(*ids.shape, 4, generator=g, dtype=torch.float64)


def _gap(model: nn.Module, inputs: tuple, group: GaugeGroup):
    fm = flat_model(model, inputs)
    jac = jacobian_of(fm)
    rank = rank_of(jac, rtol=1e-9).rank
    return locate_gap(jac, orbit_projector(model, group), rank, fm.names, fm.sizes), rank


def test_unread_rows_and_located_directions() -> None:
    model = _model()
    # rows 6-9 are never read
    ids = torch.randint(0, 6, (64, 3), generator=torch.Generator().manual_seed(0))
    inputs = _inputs(ids)
    group = gaugenet.symmetries(model, inputs)
    gap, rank = _gap(model, inputs, group)
    n = sum(p.numel() for p in model.parameters())
    assert gap.unread == (("emb.weight", 16),) and gap.unread_dim == 16
    assert gap.missing == n - rank - group.dim
    # the rest: a vector added to every row and taken back by lin1's bias (4), which
    # discovery does not offer, lives in the table and lin1's bias
    where = dict(gap.located)
    assert abs(sum(where.values()) - (gap.missing - 16)) < 0.25  # shares < 0.05 not listed
    assert set(where) <= {"emb.weight", "lin1.bias"}
    # without the group, the ReLU rescalings show up too, in the layers around the ReLU
    empty = GaugeGroup((), (), group.param_names)
    gap0, _ = _gap(model, inputs, empty)
    assert gap0.missing == gap.missing + group.dim
    where0 = dict(gap0.located)
    assert where0.get("lin2.weight", 0) > 1
    assert "no effect" in gap0.lines()[0] and "unexplained" in gap0.lines()[1]


def test_no_gap_when_every_row_is_read() -> None:
    """The negative: with every row read no entry is reported unread; what remains is the
    row shift into lin1's bias (4 directions)."""
    model = _model()
    ids = torch.arange(10).repeat(8, 1)[
        :, torch.randperm(10, generator=torch.Generator().manual_seed(1))
    ]
    inputs = _inputs(ids)
    group = gaugenet.symmetries(model, inputs)
    gap, rank = _gap(model, inputs, group)
    n = sum(p.numel() for p in model.parameters())
    assert gap.unread == () and gap.missing == n - rank - group.dim == 4
    report = certify(model, inputs, group=group, method="exact")
    assert report.unexplained == 4
    assert not any("no effect" in c for c in report.causes)
    assert any("4 unexplained directions" in c for c in report.causes)


def test_certify_names_unread_rows() -> None:
    model = _model()
    ids = torch.randint(0, 6, (64, 3), generator=torch.Generator().manual_seed(0))
    report = certify(model, _inputs(ids), method="exact")
    assert report.unexplained == 16 + 4
    assert any(
        "16 directions of entries with no effect" in c and "emb.weight (16)" in c
        for c in report.causes
    )


class _Parallel(nn.Module):
    """`LN(e + mlp(e))` for token embeddings `e`: the MLP reads only the token's row, so on
    token inputs it is a table of one row per token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.up = nn.Linear(4, 12)
        self.down = nn.Linear(12, 4)
        self.ln = nn.LayerNorm(4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids)
        return self.ln(e + self.down(torch.tanh(self.up(e))))


def test_lookup_cause_names_layers_fed_by_a_table() -> None:
    """The MLP's 112 parameters act on the outputs only through 5 token rows of 4 numbers:
    most of them are redundant on token inputs, and certify says why; a continuous input
    (the negative) gives no such cause."""
    from gaugenet.certify._causes import lookup_causes

    torch.manual_seed(0)
    model = _Parallel().double()
    ids = torch.randint(0, 5, (40, 6), generator=torch.Generator().manual_seed(0))
    report = certify(model, ids, method="exact")
    assert report.unexplained is not None and report.unexplained > 50
    assert any(
        "of layers fed by a table of 5 distinct input rows: up.weight" in c for c in report.causes
    )
    mlp = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    x = torch.randn(40, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert lookup_causes(mlp, x) == []
