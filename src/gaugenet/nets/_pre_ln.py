"""A tiny pre-LN decoder: token and position tables, causal softmax attention and a ReLU
MLP per block, a final LayerNorm and an untied head. Its residual stream is written by
embeddings and linear maps and read only through LayerNorms, so it rotates by `O(d − 1)`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PreLN"]


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.o = nn.Linear(d, d)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        split = lambda z: z.reshape(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        s = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)).masked_fill(~mask, -1e9)
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, d: int, ln_bias: bool, bias: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=ln_bias), nn.LayerNorm(d, bias=ln_bias)
        self.attn = _Attention(d, 2, bias)
        self.up, self.down = nn.Linear(d, 2 * d, bias=bias), nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(torch.relu(self.up(self.ln2(x))))


class PreLN(nn.Module):
    """Token ids `(batch, tokens ≤ 5)` → logits `(batch, tokens, 10)`: tables of 10 tokens
    and 5 positions of width `d`, two pre-LN blocks (2 heads), a final LayerNorm, a head.
    `ln_bias`: the LayerNorms have `β`; `bias`: the readers of the LayerNorms have biases."""

    def __init__(self, d: int = 6, ln_bias: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(10, d), nn.Embedding(5, d)
        self.blocks = nn.Sequential(_Block(d, ln_bias, bias), _Block(d, ln_bias, bias))
        self.lnf = nn.LayerNorm(d, bias=ln_bias)
        self.head = nn.Linear(d, 10, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(self.lnf(self.blocks(x)))
