"""Pattern rule: attention whose scores pass an elementwise nonlinear map before the
softmax (Gemma 2's soft-capping `c · tanh(s / c)`). The query-key and value-output `GL`
per head hold as without it (the key bias turning with the keys); the key-bias shift does
not (see `_score_maps.py`; code in `_attention.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._score_maps import SCORE_MAPS
from ._examples import batch, seeded
from ._rule import Example, Rule

__all__ = ["RULES", "SoftCappedAttention"]


class SoftCappedAttention(nn.Module):
    """Self-attention of `heads` heads (`d` wide, every projection biased) whose scores are
    soft-capped, `cap · tanh(s / cap)`, before the softmax (`cap=None`: plain softmax)."""

    def __init__(self, d: int = 4, heads: int = 2, cap: float | None = 1.0) -> None:
        super().__init__()
        self.h, self.cap = heads, cap
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def _heads(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        return x.reshape(b, t, self.h, d // self.h).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        s = torch.matmul(q, k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        if self.cap is not None:
            s = torch.tanh(s / self.cap) * self.cap
        a = torch.matmul(torch.softmax(s, dim=-1), v)
        return self.o(a.transpose(1, 2).reshape(x.shape))


def _capped() -> tuple[nn.Module, Any]:
    return seeded(SoftCappedAttention), batch(32, 5, 4)


RULES = (
    Rule(
        "soft-capped attention scores",
        "soft_capping",
        None,
        (
            Example(
                _capped,
                20,
                "query-key GL(2) per head with the key bias (2 × 4), value-output GL(2) per "
                "head (2 × 4), the value bias moved into the output bias (4); no key shift",
            ),
        ),
        where="`gaugenet.discovery._attention._manual_core`, elementwise maps "
        + ", ".join(sorted(str(getattr(m, "__name__", m)) for m in SCORE_MAPS))
        + " between the scores and the softmax",
    ),
)
