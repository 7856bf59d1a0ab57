"""A small vision transformer for 8×8 digits, and its gauge group with the residual stream.

Pre-LN blocks (`h + attn(LN(h))`, then `h + fc2(relu(fc1(LN(h))))`) with LayerNorms
without affine part, so that the residual stream carries the rotations of
`gaugenet.apply._residual` besides what `gaugenet.symmetries` finds (per-head query-key
and value-output `GL`, head and hidden-unit permutations, hidden-unit rescalings, key and
value shifts, the LayerNorm kernel and centering translations).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..discovery import symmetries
from ..groups import GaugeGroup
from ._residual import residual_factors

__all__ = ["DigitsViT", "vit_group"]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.fc1 = nn.Linear(d, ff)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(ff, d)

    def forward(self, h: Tensor) -> Tensor:
        y = self.norm1(h)
        h = h + self.attn(y, y, y, need_weights=False)[0]
        return h + self.fc2(self.act(self.fc1(self.norm2(h))))


class DigitsViT(nn.Module):
    """Images `(N, 1, 8, 8)` → `patch×patch` patches → linear embedding plus learned
    positions → `layers` pre-LN blocks → LayerNorm, mean over tokens → logits `(N, 10)`."""

    def __init__(
        self, d: int = 32, heads: int = 4, ff: int = 64, layers: int = 2, patch: int = 2
    ) -> None:
        super().__init__()
        self.patch, self.d = patch, d
        tokens = (8 // patch) ** 2
        self.embed = nn.Linear(patch * patch, d)
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, d))
        self.blocks = nn.ModuleList(_Block(d, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.head = nn.Linear(d, 10)

    def stream(self, x: Tensor) -> list[Tensor]:
        """The residual stream after the embedding and after every block: `(N, tokens, d)`
        each."""
        n, p, s = x.shape[0], self.patch, 8 // self.patch
        x = x.reshape(n, s, p, s, p).permute(0, 1, 3, 2, 4).reshape(n, s * s, p * p)
        out = [self.embed(x) + self.pos]
        for blk in self.blocks:
            out.append(blk(out[-1]))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.stream(x)[-1]).mean(1))

    def residual_stream(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """`(writers, readers)`: the parameters writing into and reading from the stream,
        with the axis that runs over it (see `residual_factors`)."""
        writers = [("embed.weight", 0), ("embed.bias", 0), ("pos", 1)]
        readers = [("head.weight", 1)]
        for i in range(len(self.blocks)):
            b = f"blocks.{i}"
            writers += [(f"{b}.attn.out_proj.weight", 0), (f"{b}.attn.out_proj.bias", 0)]
            writers += [(f"{b}.fc2.weight", 0), (f"{b}.fc2.bias", 0)]
            readers += [(f"{b}.attn.in_proj_weight", 1), (f"{b}.fc1.weight", 1)]
        return writers, readers


def vit_group(model: DigitsViT, example_inputs: Any) -> GaugeGroup:
    """`gaugenet.symmetries(model)` with the residual stream's rotation and permutation
    factors (`rot:residual`, `perm:residual`) added."""
    found = symmetries(model, example_inputs)
    writers, readers = model.residual_stream()
    extra = residual_factors("residual", model.d, writers, readers)
    return GaugeGroup(
        (*found.factors, *extra),
        found.breakers,
        found.param_names,
        found.signature,
        found.example_inputs,
    )
