"""Recurrent layers (`nn.LSTM`, `nn.GRU`, `nn.RNN`): not analyzed. Their outputs are tuples
the rules do not follow, so every label reaching them is fixed, and their parameters are
named among the breakers (`_unanalyzed.py`). They stay traced as `torch.fx` leaves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, fx, nn

from ._common import Unsupported
from ._examples import batch, seeded
from ._rule import Example, Rule

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["RULES"]


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
                0,
                "nothing is claimed; the Jacobian sees b_ih + b_hh, whose difference is free "
                "(4 gates × 4 units = 16)",
                jacobian_dim=16,
            ),
            Example(
                lambda: (seeded(lambda: _Reader(nn.GRU(3, 4, batch_first=True))), batch(24, 5, 3)),
                0,
                "nothing is claimed; the Jacobian sees the reset and update gates' b_ih + b_hh "
                "(2 gates × 4 units = 8; the new gate's b_hn sits inside r ⊙ ·)",
                jacobian_dim=8,
            ),
        ),
        modules=(nn.LSTM, nn.GRU, nn.RNN),
        several_outputs=True,
        atomic=False,
    ),
)
