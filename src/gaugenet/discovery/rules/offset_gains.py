"""Pattern rule: gains stored with an offset, `x̂ · (w + c)` (Gemma's RMSNorm, `c = 1`).

The product rule (`arithmetic.mul`) reads `w + c` as a gain whose effective value rescales:
`w ↦ α (w + c) − c` against its readers' columns (`groups/_offset_scale.py`); the
residual-stream rotation conjugates its readers by `w + c` (`_stream.py`). Both are found
through `_offset_gain.offset_gain`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._offset_gain import offset_gain
from ._examples import batch, seeded, token_ids
from ._rule import Example, Rule

__all__ = ["RULES", "OffsetRMS", "OffsetStream"]


def _rms(x: Tensor, w: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)


class OffsetRMS(nn.Module):
    """An RMSNorm with the gain `1 + w` (written out) before a linear reader."""

    def __init__(self, d: int = 4, out: int = 2) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) - 0.5)  # effective gains in (0.5, 1.5)
        self.out = nn.Linear(d, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(_rms(x, self.w))


class OffsetStream(nn.Module):
    """An embedding, one residual MLP write, RMS normalizations with gains `1 + w`, a
    linear head. The shape check makes `torch.fx` fail, so it is captured by `torch.export`."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 4)
        self.w1, self.w2 = nn.Parameter(torch.rand(4) - 0.5), nn.Parameter(torch.rand(4) - 0.5)
        self.up, self.down = nn.Linear(4, 5, bias=False), nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(4, 8, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.ndim != 2:
            raise ValueError("expects (batch, tokens)")
        x = self.emb(ids)
        x = x + self.down(torch.relu(self.up(_rms(x, self.w1))))
        return self.head(_rms(x, self.w2))


def _rms_reader() -> tuple[nn.Module, Any]:
    return seeded(OffsetRMS), batch(64, 4)


def _stream() -> tuple[nn.Module, Any]:
    return seeded(OffsetStream), token_ids(40, 16, 5)


RULES = (
    Rule(
        "offset gains",
        "offset_gains",
        None,
        (
            Example(
                _rms_reader,
                4,
                "the effective gain 1 + w of each feature scaled against the reading column: 4",
            ),
            Example(
                _stream,
                19,
                "the stream rotated by O(4), readers conjugated by 1 + w (6), one scale per "
                "MLP unit (5), 1 + w₁ and 1 + w₂ scaled per feature against their readers' "
                "columns (4 + 4); as for plain gains, the last RMS normalization also hides "
                "one direction of each table row and the Jacobian has no clear gap",
                jacobian=False,
            ),
        ),
        where=f"`{offset_gain.__module__}.offset_gain`, from the product rule and the "
        "residual-stream rotation",
    ),
)
