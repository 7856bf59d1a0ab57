"""Measured causes of a gap: each missing direction is attributed by projection to entries
read only together, layers fed by a table or LayerNorms with a tiny `eps`, or stays
unexplained; attribution never swallows a symmetry that discovery does not offer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import gaugenet
from gaugenet.certify import GapReport, certify, locate_gap
from gaugenet.certify._attribute import CauseSpace, attribute
from gaugenet.certify._functional_dimension import rank_of
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.certify._orbit import Orbit, orbit_projector
from gaugenet.certify._table_cause import table_fed
from gaugenet.groups import GaugeGroup

F64 = torch.float64


def _gap(model: nn.Module, inputs: object, group: GaugeGroup | None = None) -> GapReport:
    group = group if group is not None else gaugenet.symmetries(model, inputs)
    fm = flat_model(model, inputs)
    jac = jacobian_of(fm)
    rank = rank_of(jac, rtol=1e-9).rank
    gap = locate_gap(jac, orbit_projector(model, group), rank, fm.names, fm.sizes, flat=fm)
    assert gap.missing == jac.shape[1] - rank - group.dim
    assert gap.unread_dim + sum(d for _, d, _ in gap.explained) + gap.unexplained == gap.missing
    return gap


def _dims(gap: GapReport) -> dict[str, int]:
    """Explained dimension per kind of cause (the first word that tells them apart)."""
    kinds = {"fixed sum": "together", "table": "table", "LayerNorm": "eps"}
    out = dict.fromkeys(kinds.values(), 0)
    for reason, d, _ in gap.explained:
        kind = next((v for k, v in kinds.items() if k in reason), None)
        assert kind is not None or d == 0, reason
        if kind is not None:
            out[kind] += d
    return out


def _x(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- the projection itself ---------------------------------------------------------------


def test_attribution_is_a_projection_not_a_count() -> None:
    """Missing `e0, e1` in R^4: a cause along `e0 + e1` explains one direction, not two; one
    leaning out of the missing span by 1e-3 explains none; counts follow the order."""
    missing = torch.eye(4, dtype=F64)[:, :2]
    orbit = Orbit(torch.zeros(0, 4, dtype=F64))
    one = CauseSpace("a", (), torch.tensor([[1.0], [1.0], [0.0], [0.0]], dtype=F64))
    out = CauseSpace("b", (), torch.tensor([[1.0], [0.0], [1e-3], [0.0]], dtype=F64))
    both = CauseSpace("c", (), torch.eye(4, dtype=F64)[:, :2].clone())
    assert attribute(missing, orbit, [one]).dims == (1,)
    assert attribute(missing, orbit, [out]).dims == (0,)
    att = attribute(missing, orbit, [one, both, out])
    assert att.dims == (1, 1, 0) and att.rest.shape == (4, 0)
    # a cause direction that is an orbit tangent adds nothing off the orbit
    orbit0 = Orbit(torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64))
    assert attribute(torch.eye(4, dtype=F64)[:, 1:2], orbit0, [out]).dims == (0,)


# -- LayerNorm eps -----------------------------------------------------------------------


class _Norm(nn.Module):
    """`LN(a(x))`: scaling `a` is a symmetry up to `eps`."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.n = nn.LayerNorm(4, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.n(self.a(x))


class _PostNorm(nn.Module):
    """`LN2(h + b(h))`, `h = LN1(a(x))`: two scalings up to `eps` (the first norm's input,
    and the second's through the first norm's affine and `b`), and redundancy of the
    residual block that discovery does not offer."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.n1 = nn.LayerNorm(4, eps=eps)
        self.b = nn.Linear(4, 4)
        self.n2 = nn.LayerNorm(4, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        h = self.n1(self.a(x))
        return self.n2(h + self.b(h))


def test_tiny_eps_is_the_whole_gap_and_large_eps_removes_it() -> None:
    torch.manual_seed(0)
    gap = _gap(_Norm(1e-12).double(), _x(50, 5))
    assert gap.missing == 1 and _dims(gap)["eps"] == 1 and gap.unexplained == 0
    assert any(
        line.startswith("1 directions scaling input rows of a LayerNorm") and ": n" in line
        for line in gap.lines()
    )
    # eps = 1 is far above the rank tolerance: the scaling leaves ker J, nothing is missing
    torch.manual_seed(0)
    big = _gap(_Norm(1.0).double(), _x(50, 5))
    assert big.missing == 0 and big.explained == ()


def test_eps_attribution_leaves_other_gaps_alone() -> None:
    """Two norms: exactly two directions more with tiny eps, both attributed to eps; the
    redundancy discovery misses in the residual block stays unexplained, the same with
    either eps."""
    torch.manual_seed(0)
    tiny = _gap(_PostNorm(1e-12).double(), _x(50, 5))
    torch.manual_seed(0)
    big = _gap(_PostNorm(1.0).double(), _x(50, 5))
    assert tiny.missing == big.missing + 2
    assert _dims(tiny)["eps"] == 2 and _dims(big)["eps"] == 0
    assert tiny.unexplained == big.unexplained > 0


class _EmbeddingNorm(nn.Module):
    """`out(LN(tok(ids) + pos))`: a token that occurs at one position only gives rows that
    its embedding row alone makes, which can be scaled alone."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(40, 4)
        self.pos = nn.Embedding(4, 4)
        self.ln = nn.LayerNorm(4, eps=eps)
        self.out = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.ln(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))))


def test_eps_scales_rows_one_token_makes() -> None:
    """Hand count: one scaling of the whole input, and one per token seen at one position
    only (the rows it makes are scaled through its embedding row alone); all of them leave
    with eps = 1, and the rest of the gap is the same with either eps."""
    ids = torch.randint(1, 40, (30, 4), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    pos = torch.arange(4).expand(30, 4)
    single = sum(1 for t in ids.unique() if pos[ids == t].unique().numel() == 1)
    assert single > 5
    torch.manual_seed(0)
    tiny = _gap(_EmbeddingNorm(1e-12).double(), ids)
    torch.manual_seed(0)
    big = _gap(_EmbeddingNorm(1.0).double(), ids)
    assert _dims(tiny)["eps"] == 1 + single == tiny.missing - big.missing
    assert _dims(big)["eps"] == 0 and tiny.unexplained == big.unexplained
    assert _dims(tiny)["together"] == _dims(big)["together"] == 3  # token 0 with position 0


def test_certify_reports_the_measured_eps_cause() -> None:
    torch.manual_seed(0)
    report = certify(_Norm(1e-12).double(), _x(50, 5), method="exact")
    assert report.unexplained == 1
    assert any("1 directions scaling input rows of a LayerNorm" in c for c in report.causes)
    assert not any("unexplained directions" in c for c in report.causes)


# -- entries read only together ----------------------------------------------------------


class _EmbeddingSum(nn.Module):
    """`down(tanh(up(tok(ids) + pos + x)))`: token and position rows summed, with a
    continuous input so that no layer is fed by a table."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(6, 3)
        self.pos = nn.Embedding(4, 3)
        self.up = nn.Linear(3, 5)
        self.down = nn.Linear(5, 2)

    def forward(self, ids: Tensor, x: Tensor) -> Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1])) + x
        return self.down(torch.tanh(self.up(h)))


def test_token_only_at_one_position_is_read_together() -> None:
    """Token 0 fills position 0 and occurs nowhere else: its row and position 0's are read
    only as a sum (3 directions). With token 0 anywhere the directions vanish; the shifts
    between the tables that discovery does not offer stay unexplained in both."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 6, (30, 4), generator=g)
    ids[:, 0] = 0
    x = _x(30, 4, 3, seed=1)
    torch.manual_seed(0)
    fixed = _gap(_EmbeddingSum().double(), (ids, x))
    torch.manual_seed(0)
    varied = _gap(_EmbeddingSum().double(), (torch.randint(0, 6, (30, 4), generator=g), x))
    assert _dims(fixed) == {"together": 3, "table": 0, "eps": 0}
    assert _dims(varied) == {"together": 0, "table": 0, "eps": 0}
    assert fixed.missing == varied.missing + 3
    assert fixed.unexplained == varied.unexplained > 0
    line = next(line for line in fixed.lines() if "fixed sum" in line)
    assert line.startswith("3 directions") and "pos.weight" in line and "tok.weight" in line


def test_equal_and_opposite_columns_are_grouped() -> None:
    """Columns `c, d, −c, c, e` (tensors `p` of 2 entries, `q` of 3): one group of three
    (two directions, both in `ker J`), nothing else; a column off by more than the floor
    stays out; tensors paired whole are left out."""
    from gaugenet.certify._together_cause import together_cause

    c, d, e = _x(3, 30).unbind(0)
    jac = torch.stack([c, d, -c, c, e], 1)
    cause = together_cause(jac, 1e-9, ["p", "q"], [2, 3])
    assert cause.directions.shape == (5, 2) and cause.where == ("p", "q")
    assert float((jac @ cause.directions).abs().max()) < 1e-12
    assert set(cause.directions.abs().sum(1).nonzero().flatten().tolist()) == {0, 2, 3}
    jac[:, 3] += 1e-6 * e
    assert together_cause(jac, 1e-9, ["p", "q"], [2, 3]).directions.shape == (5, 1)
    # p = (c, d) and q = (c, d): whole tensors read only in their sum
    whole = torch.stack([c, d, c, d], 1)
    assert together_cause(whole, 1e-9, ["p", "q"], [2, 2]).directions.shape == (4, 0)


class _TwoMaps(nn.Module):
    """`c(tanh(a(x) + b(x)))`: the two weights are only ever read in their sum, on any
    input: a symmetry (which discovery does not offer), not a property of the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(3, 5)
        self.c = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.tanh(self.a(x) + self.b(x)))


def test_whole_tensors_summed_stay_unexplained() -> None:
    """Every entry of `a.weight` has the same Jacobian column as its twin in `b.weight`; the
    15 differences are a missing symmetry and stay unexplained."""
    torch.manual_seed(0)
    gap = _gap(_TwoMaps().double(), _x(40, 3))
    assert gap.missing == 15 and gap.unexplained == 15
    assert _dims(gap) == {"together": 0, "table": 0, "eps": 0}
    assert dict(gap.located) == pytest.approx({"a.weight": 7.5, "b.weight": 7.5})


# -- layers fed by a table ---------------------------------------------------------------


class _Parallel(nn.Module):
    """`LN(e + down(act(up(e))))` for token embeddings `e`: the MLP reads only the token's
    row, so on token inputs it is a table of one row per token."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.up = nn.Linear(4, 12)
        self.act = act
        self.down = nn.Linear(12, 4)
        self.ln = nn.LayerNorm(4)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.emb(ids)
        return self.ln(e + self.down(self.act(self.up(e))))


_IDS = torch.randint(0, 5, (40, 6), generator=torch.Generator().manual_seed(0))


def test_table_fed_layers_explain_their_redundancy() -> None:
    torch.manual_seed(0)
    model = _Parallel(nn.Tanh()).double()
    gap = _gap(model, _IDS)
    assert _dims(gap)["table"] > 90  # most of the MLP's 112 parameters
    assert gap.unexplained < 10
    line = next(line for line in gap.lines() if "table" in line)
    assert "table of 5 distinct input rows" in line and "up.weight" in line
    # a continuous input: no layer is fed by a table
    x = _x(40, 6, 4)
    mlp = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    assert table_fed(flat_model(mlp, x)) == {}


def test_table_does_not_swallow_a_missing_symmetry() -> None:
    """The ReLU rescalings (12) taken out of the group are symmetries on every input, so
    they stay in the kernel when the table is broken: all 12 stay unexplained."""
    torch.manual_seed(0)
    model = _Parallel(nn.ReLU()).double()
    group = gaugenet.symmetries(model, _IDS)
    scale = [f for f in group.factors if f.name.startswith("scale")]
    assert sum(f.dim for f in scale) == 12
    kept = tuple(f for f in group.factors if not f.name.startswith("scale"))
    cut = GaugeGroup(kept, (), group.param_names)
    full, less = _gap(model, _IDS, group), _gap(model, _IDS, cut)
    assert less.missing == full.missing + 12
    assert less.unexplained == full.unexplained + 12
    assert _dims(less) == _dims(full)


def test_a_cause_that_cannot_be_measured_explains_nothing(monkeypatch) -> None:
    """When a cause cannot be measured its directions stay unexplained, nothing raises."""
    from gaugenet.certify import _gap as gap_module

    def fail(*args: object) -> None:
        raise RuntimeError("hooks refused")

    monkeypatch.setattr(gap_module, "table_cause", fail)
    torch.manual_seed(0)
    gap = _gap(_Parallel(nn.Tanh()).double(), _IDS)
    assert _dims(gap)["table"] == 0 and gap.unexplained == gap.missing > 90
