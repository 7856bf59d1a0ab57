"""The free factor: parameter entries no output reads (never used, used only by dead code, or
table rows that constant indices never select) move freely; indices an input or a parameter
decides claim nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import gaugenet
from gaugenet.discovery.rules._examples import batch, seeded, token_ids
from gaugenet.discovery.rules.patterns import _DeadBranch, _Positions
from gaugenet.dynamics import noether_charges
from gaugenet.groups import FreeFactor, FreeRows


def _free(group: gaugenet.GaugeGroup) -> FreeFactor | None:
    found = [f for f in group.factors if isinstance(f, FreeFactor)]
    return found[0] if found else None


def _claimed(group: gaugenet.GaugeGroup) -> dict[str, list[int]]:
    f = _free(group)
    return {} if f is None else {t.param: t.rows.tolist() for t in f.terms}


def _out(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def test_dead_branch_and_unused_parameter_are_free_and_complete() -> None:
    model, x = seeded(_DeadBranch), batch(64, 3)
    group = gaugenet.symmetries(model, x)
    assert _claimed(group) == {"extra": [0, 1, 2], "unused.weight": list(range(5)),
                               "unused.bias": list(range(5))}  # fmt: skip
    # the dead layer's own rescalings and permutations are among the free moves
    assert not [f for f in group.factors if "unused" in f.name]
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete", report
    assert group.dim == 32 == report.n_params - report.functional_dimension


def test_a_dead_consumer_no_longer_breaks_symmetries() -> None:
    """A sine of the hidden layer that nothing reads used to fix its units' rescalings."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            _ = torch.sin(h)
            return self.b(torch.relu(h))

    model, x = seeded(Net), batch(64, 3)
    group = gaugenet.symmetries(model, x)
    assert group.dim == 4 and _free(group) is None
    assert gaugenet.certify(model, x, group=group).verdict == "complete"


def test_constant_index_rows_are_free() -> None:
    model, ids = seeded(_Positions), token_ids(6, 8, 5)
    group = gaugenet.symmetries(model, ids)
    assert _claimed(group) == {"pos.weight": [5, 6, 7]}
    report = gaugenet.certify(model, ids, group=group)
    assert report.verdict == "complete", report


def test_a_read_row_is_not_free() -> None:
    """Negative: the free factor's moves keep the outputs, the same move of a read row
    (and of a read parameter) changes them."""
    model, ids = seeded(_Positions), token_ids(6, 8, 5)
    group = gaugenet.symmetries(model, ids)
    f = _free(group)
    assert f is not None
    ref = _out(model, ids)
    g = {f.name: f.sample(torch.Generator().manual_seed(0), torch.float64, 1.0)}
    moved = group.act(model, g)
    assert (moved.pos.weight[5:] - model.pos.weight[5:]).abs().min() > 0
    assert (_out(moved, ids) - ref).abs().max() < 1e-12
    other = FreeFactor("read", 8, terms=(FreeRows("pos.weight", torch.tensor([3, 4]), 4),))
    state = other.apply(gaugenet.groups.model_state(model), other.sample(scale=1.0))
    broken = copy.deepcopy(model)
    gaugenet.groups.load_state(broken, {"pos.weight": state["pos.weight"]})
    assert (_out(broken, ids) - ref).abs().max() > 1e-3


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.relu(self.emb(ids)))


def test_token_rows_the_inputs_miss_are_not_claimed() -> None:
    """Rows 6..9 are never selected by these ids, yet other ids would select them: they are
    redundant on these inputs (certify says so), not symmetries."""
    model, ids = seeded(_Tokens), token_ids(6, 8, 5)
    group = gaugenet.symmetries(model, ids)
    assert _free(group) is None
    assert gaugenet.certify(model, ids, group=group).verdict == "incomplete"
    other = token_ids(10, 8, 5)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.emb.weight[6:] += 1.0
    assert (_out(moved, other) - _out(model, other)).abs().max() > 1e-3


class _Indexed(nn.Module):
    """A table looked up at an index that `mode` computes: from the input's values, from a
    parameter, from the input's shape (a traced length), or a constant overwritten where the
    input says."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.table, self.out = nn.Embedding(8, 4), nn.Linear(4, 3)
        self.pick = nn.Parameter(torch.tensor([0.1, 2.0, -1.0]))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "data":
            idx = (x[:, 0] > 0).long() + 2
        elif self.mode == "param":
            idx = torch.argmax(self.pick).reshape(1) + 2
        elif self.mode == "shape":
            idx = torch.arange(x.shape[1]) + 2
        else:
            idx = torch.arange(3) + 2
            idx[x[0, :3] > 0] = 7
        rows = self.table(idx)
        return self.out(torch.relu(x[..., :1] * rows.sum(0) + x.mean(-1, keepdim=True)))


@pytest.mark.parametrize("mode", ["data", "param", "shape", "overwritten"])
def test_indices_an_input_or_parameter_decides_claim_no_rows(mode: str) -> None:
    model, x = seeded(lambda: _Indexed(mode)), batch(32, 3)
    group = gaugenet.symmetries(model, x)
    assert "table.weight" not in _claimed(group)


@pytest.mark.parametrize(
    "build",
    [lambda: (seeded(_Positions), token_ids(6, 8, 5)), lambda: (seeded(_DeadBranch), batch(64, 3))],
)
def test_group_laws_with_the_free_factor(build) -> None:
    """`act(act(θ, g), h) == act(θ, compose(g, h))` and `g⁻¹` undoes `g`, permutations and
    rescalings included."""
    model, x = build()
    group = gaugenet.symmetries(model, x)
    assert _free(group) is not None
    gen = torch.Generator().manual_seed(1)
    state = gaugenet.groups.model_state(model)
    for _ in range(3):
        g, h = group.sample(gen), group.sample(gen)
        twice = group.act_state(group.act_state(state, g), h)
        once = group.act_state(state, group.compose(g, h))
        for k in state:
            assert torch.allclose(twice[k], once[k], atol=1e-12), k
        back = group.act_state(group.act_state(state, g), group.inverse(g))
        assert all(torch.allclose(back[k], state[k], atol=1e-12) for k in state)


def test_free_factor_gauge_and_charge() -> None:
    model, ids = seeded(_Positions), token_ids(6, 8, 5)
    group = gaugenet.symmetries(model, ids)
    f = _free(group)
    assert f is not None
    # the natural gauge: the free rows set to zero, outputs unchanged, idempotent
    canon = gaugenet.canonicalize(model, example_inputs=ids)
    assert canon.pos.weight[5:].abs().max() == 0
    assert (_out(canon, ids) - _out(model, ids)).abs().max() < 1e-10
    again = gaugenet.canonicalize(canon, example_inputs=ids)
    assert torch.allclose(again.pos.weight, canon.pos.weight, atol=1e-10)
    # the charge is the entries themselves: the loss gradient on them is zero
    charge = noether_charges(model, group)[f.name]
    assert torch.equal(charge, model.pos.weight[5:].detach().reshape(-1))
    model.zero_grad()
    model(ids).square().sum().backward()
    assert model.pos.weight.grad[5:].abs().max() == 0
    assert model.pos.weight.grad[:5].abs().max() > 0


class _Biased(nn.Module):
    """A linear map plus the sum of three rows of a table of six, looked up at a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.table = nn.Linear(3, 4), nn.Embedding(6, 4)
        self.register_buffer("picks", torch.tensor([0, 2, 1]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x) + self.table(self.picks).sum(0))


def test_rows_are_claimed_only_for_inputs_the_caller_gives() -> None:
    """Constant indices can depend on the example's shapes (a position buffer sliced to an
    export-specialized length): rows are claimed for inputs the caller chose, never for
    inputs discovery inferred (here `(2, 3)`, the first layer's width)."""
    model = seeded(_Biased)
    inferred = gaugenet.symmetries(model)
    assert _claimed(inferred) == {} and inferred.dim == 0
    group = gaugenet.symmetries(model, batch(16, 3))
    assert _claimed(group) == {"table.weight": [3, 4, 5]}
    assert group.dim == 12  # the bias moved between the summed rows is not discovered
