"""`certify` measures each factor (tangents in ker J, the action keeps the outputs) and
returns a verdict: wrong factors are named, a crashing action is wrong, a good model is
complete, unanalysed recurrent layers are named, the memory budget is respected."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet import GaugeError
from gaugenet.certify import Verdict
from gaugenet.certify._checks import act_tolerance
from gaugenet.groups import GaugeGroup, RescalingFactor, Scale

F64 = torch.float64


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    return model, x


def _bad_factor() -> RescalingFactor:
    """A hand-made 'rescaling' of hidden unit 0 that forgets to divide the next layer's
    column: `W1[0] *= a`, `b1[0] *= a` but `W2[:, 0]` untouched (outputs change)."""
    row = torch.tensor([0, 1, 1, 1, 1, 1]).reshape(6, 1)
    return RescalingFactor(
        "bad", 1, terms=(Scale("0.weight", row, 1), Scale("0.bias", row.reshape(6), 1))
    )


def test_good_model_is_complete() -> None:
    model, x = _mlp()
    report = gaugenet.certify(model, x)
    assert report.verdict is Verdict.COMPLETE and report.ok
    assert report.method == "exact" and report.exact and report.unexplained == 0
    assert report.symmetry_dim == 6 and report.functional_dimension == 44 - 6
    assert 0 <= report.worst_residual < 1e-13  # measured: rounding level
    assert report.act_error < 1e-13 and report.act_tol == pytest.approx(act_tolerance(F64))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["verdict"] == "complete" and data["tangent_residuals"]
    assert "complete" in repr(report) and "verdict               complete" in str(report)


def test_wrong_factor_is_named() -> None:
    model, x = _mlp()
    group = gaugenet.symmetries(model, x)
    bad = GaugeGroup((*group.factors, _bad_factor()), group.breakers, group.param_names)
    # the count alone is fooled: 44 − 38 = 6 + 1 would be "negative", but dims can match
    # too; the measurements are not: the bad factor's tangent is far from ker J
    report = gaugenet.certify(model, x, group=bad)
    assert report.verdict is Verdict.WRONG and not report.ok
    assert report.wrong == ("bad",)
    assert report.tangent_residuals["bad"] > 1e-3
    assert max(v for k, v in report.tangent_residuals.items() if k != "bad") < 1e-13
    assert report.act_error > 0.05  # the outputs do move
    assert any("ker J" in r for r in report.reasons)
    assert "wrong factor bad" in str(report)


def test_wrong_factor_that_keeps_the_count() -> None:
    """Replace the true rescaling by the bad one plus five true directions: the dimensions
    add up to the same total, yet the verdict is wrong and names it."""
    model, x = _mlp()
    group = gaugenet.symmetries(model, x)
    (true,) = group.of_kind("rescaling")
    # units 1..5 only: index k -> k - 1, unit 0 and "none" (6) -> "none" (5)
    terms = tuple(
        Scale(t.param, torch.where((t.index == 0) | (t.index == 6), 5, t.index - 1), t.power)
        for t in true.terms
    )
    five = RescalingFactor("five", 5, terms=terms)
    perms = tuple(f for f in group.factors if f.kind == "permutation")
    fooled = GaugeGroup((five, _bad_factor(), *perms), group.breakers, group.param_names)
    assert fooled.dim == group.dim
    report = gaugenet.certify(model, x, group=fooled)
    assert report.unexplained == 0  # counting alone would certify it
    assert report.verdict is Verdict.WRONG and report.wrong == ("bad",)


class _Crashing(RescalingFactor):
    def apply(self, state, a):
        raise RuntimeError("boom")


def test_crashing_act_is_wrong() -> None:
    model, x = _mlp()
    group = gaugenet.symmetries(model, x)
    crash = _Crashing("crash", 1, terms=())
    bad = GaugeGroup((*group.factors, crash), group.breakers, group.param_names)
    report = gaugenet.certify(model, x, group=bad)
    assert report.verdict is Verdict.WRONG
    assert "crash" in report.wrong
    why = dict(zip(report.wrong, report.reasons))["crash"]
    assert "raises RuntimeError: boom" in why


class _Rnn(nn.Module):
    def __init__(self, cls: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cls(3, 4, batch_first=True)
        self.hid = nn.Linear(4, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hid(self.rnn(x)[0][:, -1])))


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layer_is_a_named_breaker(cls) -> None:
    torch.manual_seed(0)
    model = _Rnn(cls).double()
    x = torch.randn(2, 5, 3, dtype=F64)
    group = gaugenet.symmetries(model, x)
    names = [b for b in group.breakers if b.node == "rnn"]
    assert names and "not analysed" in names[0].reason and cls.__name__ in names[0].reason
    # negative: a model without the recurrent layer names no such breaker (containers
    # such as nn.ModuleList are no layers either)
    plain = _Stack().double()
    assert not any("not analysed" in b.reason for b in gaugenet.symmetries(plain).breakers)


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 5), nn.Linear(5, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](torch.relu(self.layers[0](x)))


def test_lstm_certify_names_it() -> None:
    """The LSTM's biases come in pairs (`b_ih + b_hh`): their 16 differences are found; what
    certify still finds missing is the 12 entries of the two dead ReLU units, and it names
    the LSTM's other parameters as not analysed."""
    torch.manual_seed(0)
    model = _Rnn(nn.LSTM).double()
    x = torch.randn(200, 5, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    report = gaugenet.certify(model, x)
    assert report.verdict is Verdict.INCOMPLETE and report.exact
    assert report.symmetry_dim >= 16 and report.unexplained == 12
    assert any("12 directions of entries with no effect" in c for c in report.causes)
    assert any("2 unit(s) dead" in c for c in report.causes)
    assert any("LSTM" in c and "not analysed beyond" in c for c in report.causes)


def test_memory_budget() -> None:
    model, x = _mlp()
    with pytest.raises(GaugeError, match="memory budget 0.00 GB"):
        gaugenet.certify(model, x, memory_budget=1000)
    with pytest.raises(GaugeError, match="over the memory budget"):
        gaugenet.certify(model, x, method="exact", memory_budget=600_000)
    # auto picks what fits: the per-factor checks alone, saying so
    report = gaugenet.certify(model, x, memory_budget=450_000)
    assert report.method in ("matrix-free", "checks") and report.memory_estimate <= 450_000
    assert report.verdict is Verdict.RIGHT and report.unexplained in (0, None)
    with pytest.raises(GaugeError, match="memory_budget must be positive"):
        gaugenet.certify(model, x, memory_budget=0)


def test_too_few_outputs_gives_checks_only() -> None:
    """With fewer outputs than n_params − dim no rank can decide completeness: the verdict
    is `right` (measured), with the reason, not a number that looks like a count."""
    model, x = _mlp()
    seen: list[str] = []
    report = gaugenet.certify(model, x[:10], progress=seen.append)
    assert report.method == "checks" and report.unexplained is None
    assert report.verdict is Verdict.RIGHT
    assert any("pass more inputs" in n for n in report.notes)
    assert "act check" in seen and any(s.startswith("tangent check") for s in seen)


def test_float32_act_tolerance() -> None:
    model, x = _mlp()
    report = gaugenet.certify(model.float(), x.float(), method="checks")
    assert report.act_tol == pytest.approx(act_tolerance(torch.float32))
    assert report.act_error < report.act_tol and report.verdict is Verdict.RIGHT
