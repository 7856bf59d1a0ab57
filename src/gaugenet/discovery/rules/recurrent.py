"""Recurrent layers (`nn.LSTM`, `nn.GRU`, `nn.RNN`). Their outputs are tuples the label rules
do not follow, so every label reaching them is fixed, and they stay `torch.fx` leaves. One
symmetry of their own is found from the cell's equations: each gate reads `W_ih x + b_ih +
W_hh h + b_hh`, so only `b_ih + b_hh` matters for the gates where both biases are summed
(all 4 of an LSTM, the reset and update gates of a GRU, whose new gate has `b_hn` inside
`r ⊙ (W_hn h + b_hn)`, the one gate of an RNN): `b_ih ↦ b_ih + v`, `b_hh ↦ b_hh − v`
(`BiasDifferenceFactor`, per layer and direction). Their other symmetries (hidden-unit
permutations, say) are not analyzed, and the module stays named among the breakers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from ...groups import TranslationFactor
from ...groups._base import State
from ._common import Unsupported
from ._examples import batch, seeded
from ._rule import Example, Rule

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["RULES", "BiasDifferenceFactor", "recurrent_bias_factors"]

#: gates whose input and hidden biases are summed, as a multiple of the hidden size
_SUMMED = {nn.LSTM: 4, nn.GRU: 2, nn.RNN: 1}


@dataclass(frozen=True)
class BiasMove:
    """`into[:n] += v`, `out_of[:n] −= v`."""

    into: str
    out_of: str

    def __call__(self, new: State, v: Tensor) -> None:
        n = v.shape[0]
        for name, sign in ((self.into, 1), (self.out_of, -1)):
            b = new[name]
            new[name] = torch.cat([b[:n] + sign * v.to(b.dtype), b[n:]])


class BiasDifferenceFactor(TranslationFactor):
    """`R^n`: the difference of a recurrent layer's input and hidden biases on the gates
    where they are summed."""

    def params(self) -> tuple[str, ...]:
        t = self.terms[0]
        return (t.into, t.out_of)

    def canonical(self, state: State) -> Tensor:
        """Equal biases on the summed gates (each half of the sum)."""
        t = self.terms[0]
        return (state[t.out_of][: self.n] - state[t.into][: self.n]) / 2


def recurrent_bias_factors(m: nn.Module, prefix: str) -> tuple[list, list]:
    """The `BiasDifferenceFactor` of every layer and direction of `m` (an `nn.LSTM`,
    `nn.GRU` or `nn.RNN` with biases)."""
    gates = next((g for cls, g in _SUMMED.items() if type(m) is cls), None)
    if gates is None or not m.bias:
        return [], []
    out = []
    p = f"{prefix}." if prefix else ""
    for k in range(m.num_layers):
        for sfx in ("", "_reverse") if m.bidirectional else ("",):
            ih, hh = f"{p}bias_ih_l{k}{sfx}", f"{p}bias_hh_l{k}{sfx}"
            out.append(
                BiasDifferenceFactor(
                    f"bias_difference:{p}l{k}{sfx}",
                    gates * m.hidden_size,
                    terms=(BiasMove(ih, hh),),
                    modules=(prefix,),
                )
            )
    return out, []


def recurrent(prop: Propagator, n: fx.Node, out: Any) -> Any:
    raise Unsupported(f"module {type(prop.submodule(n)).__name__} returns several tensors")


class _Reader(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn, self.out = rnn, nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0])


RULES = (
    Rule(
        "recurrent",
        "recurrent",
        recurrent,
        (
            Example(
                lambda: (seeded(lambda: _Reader(nn.LSTM(3, 4, batch_first=True))), batch(24, 5, 3)),
                16,
                "b_ih − b_hh on all 4 gates × 4 units (only their sum enters)",
            ),
            Example(
                lambda: (seeded(lambda: _Reader(nn.GRU(3, 4, batch_first=True))), batch(24, 5, 3)),
                8,
                "b_ih − b_hh on the reset and update gates (2 × 4 units; the new gate's b_hn "
                "sits inside r ⊙ ·)",
            ),
        ),
        modules=(nn.LSTM, nn.GRU, nn.RNN),
        several_outputs=True,
        atomic=False,
    ),
)
