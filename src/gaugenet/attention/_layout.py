"""Where the per-head projection matrices of one attention layer live in a model's state.

Every attention implementation stores `W_q, W_k, W_v, W_o` differently: in the paper's
orientation (`x W`, weights `(d_in, heads·head_dim)`), as torch `Linear` weights
(`(out, in)`, `y = W x`), stacked into one `in_proj_weight`, with or without biases.
`HeadLayout` records that once, so that the gauge factors and the gauge-invariant
observables are written a single time for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from ..groups._base import State

__all__ = ["HeadLayout", "Slot"]

Orientation = Literal["paper", "torch"]


@dataclass(frozen=True)
class Slot:
    """One projection: `weight` (rows or columns `offset : offset + heads·size` belong to the
    heads, head-major) and its optional `bias` (entries `bias_offset : ...`)."""

    weight: str
    offset: int = 0
    bias: str | None = None
    bias_offset: int = 0


@dataclass(frozen=True)
class HeadLayout:
    """The per-head structure of one attention layer.

    - `prefix`: the layer's name in the model (factor names start with it).
    - `heads`, `head_dim` (query/key), `value_dim` (value/output) per head.
    - `q`, `k`, `v`, `o`: the four projections; `o.weight` is read per head on its input side.
    - `orientation`: `"paper"` (`x W`, weight `(d_in, d_out)`) or `"torch"` (`Linear`, weight
      `(d_out, d_in)`).
    """

    prefix: str
    heads: int
    head_dim: int
    value_dim: int
    q: Slot
    k: Slot
    v: Slot
    o: Slot
    orientation: Orientation = "torch"

    def name(self, what: str) -> str:
        return f"{self.prefix}.{what}" if self.prefix else what

    @property
    def in_axis(self) -> int:
        """The axis of a q/k/v weight that runs over heads·head_dim."""
        return 1 if self.orientation == "paper" else 0

    @property
    def out_axis(self) -> int:
        """The axis of the output weight that runs over heads·value_dim."""
        return 0 if self.orientation == "paper" else 1

    def _heads_of(self, w: Tensor, axis: int, offset: int, size: int) -> Tensor:
        """`(heads, other, size)` blocks of `w` along `axis`."""
        w = w.movedim(axis, 0)[offset : offset + self.heads * size]
        return w.reshape(self.heads, size, -1).transpose(-1, -2)

    def proj(self, state: State, which: Literal["q", "k", "v"]) -> Tensor:
        """Per-head `W` in the paper's orientation (`x W`): `(heads, d_in, size)`."""
        slot = getattr(self, which)
        size = self.value_dim if which == "v" else self.head_dim
        return self._heads_of(state[slot.weight], self.in_axis, slot.offset, size)

    def bias(self, state: State, which: Literal["q", "k", "v"]) -> Tensor | None:
        """Per-head bias `(heads, size)`, or `None`."""
        slot = getattr(self, which)
        if slot.bias is None:
            return None
        size = self.value_dim if which == "v" else self.head_dim
        b = state[slot.bias][slot.bias_offset : slot.bias_offset + self.heads * size]
        return b.reshape(self.heads, size)

    def out(self, state: State) -> Tensor:
        """Per-head `W_o` in the paper's orientation: `(heads, value_dim, d_out)`."""
        w = self._heads_of(state[self.o.weight], self.out_axis, self.o.offset, self.value_dim)
        return w.transpose(-1, -2)

    def qk(self, state: State) -> Tensor:
        """`W_qk = W_q W_kᵀ` per head, `(heads, d_q, d_k)`: invariant under the qk gauge."""
        return self.proj(state, "q") @ self.proj(state, "k").transpose(-1, -2)

    def vo(self, state: State) -> Tensor:
        """`W_vo = W_v W_o` per head, `(heads, d_v, d_out)`: invariant under the vo gauge."""
        return self.proj(state, "v") @ self.out(state)
