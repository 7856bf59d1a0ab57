"""Recurrent layers: the difference of the input and hidden biases where the cell sums them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.discovery._float64 import keep_float64
from gaugenet.groups import GaugeGroup


class _Reader(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn, self.out = rnn, nn.Linear(4 * (2 if rnn.bidirectional else 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0])


@pytest.mark.parametrize(
    "cls, gates, layers, bidirectional",
    [(nn.LSTM, 4, 2, True), (nn.GRU, 2, 1, False), (nn.RNN, 1, 2, False)],
)
def test_bias_difference(cls, gates, layers, bidirectional) -> None:
    torch.manual_seed(0)
    rnn = cls(3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=True)
    model = _Reader(rnn).double().eval()
    x = torch.randn(12, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    group = gaugenet.symmetries(model, x)
    mine = [f for f in group.factors if f.name.startswith("bias_difference:")]
    assert len(mine) == layers * (2 if bidirectional else 1)
    assert all(f.dim == gates * 4 for f in mine)
    with keep_float64():
        moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))
        assert gaugenet.invariance_error(model, moved, x) < 1e-12
        # the canonical form splits each sum evenly, from any point of the orbit
        a, b = gaugenet.canonicalize(model, group=group), gaugenet.canonicalize(moved, group=group)
    for f in mine:
        t = f.terms[0]
        sa = dict(a.named_parameters())
        assert torch.allclose(
            sa[f"rnn.{t.into.split('.')[-1]}"][: f.dim],
            sa[f"rnn.{t.out_of.split('.')[-1]}"][: f.dim],
        )
        sb = dict(b.named_parameters())
        assert torch.allclose(
            sa[f"rnn.{t.into.split('.')[-1]}"], sb[f"rnn.{t.into.split('.')[-1]}"]
        )


def test_gru_new_gate_bias_is_not_free() -> None:
    """The negative: moving the difference onto the GRU's new gate too (where `b_hn` sits
    inside `r ⊙ ·`) changes the outputs."""
    torch.manual_seed(0)
    model = _Reader(nn.GRU(3, 4, batch_first=True)).double().eval()
    x = torch.randn(12, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    group = gaugenet.symmetries(model, x)
    f = next(f for f in group.factors if f.name.startswith("bias_difference:"))
    wide = dataclasses.replace(f, n=12)
    one = GaugeGroup((wide,), (), group.param_names)
    with keep_float64():
        moved = one.act(model, {wide.name: torch.ones(12, dtype=torch.float64)})
        assert gaugenet.invariance_error(model, moved, x) > 1e-3
