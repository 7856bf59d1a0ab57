"""The value rows a LayerNorm feeds, moved along `(1/γ)`: what the value-row shifts of
`_value_row_shift.py` (`ValueRowShift`) and `_value_row_one.py` (`AlongOne`) share.

A bias-free value projection reading a LayerNorm with `β` carries a hidden value bias: its
rows plus `c ⊗ (1/γ)` add `c · Σ β/γ` to every token's values, so `W_v[rows] += (u/s) ⊗
(1/γ)`, with `s = Σ β/γ`, adds exactly `u` to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..groups._base import State

__all__ = ["ValueRows"]


@dataclass(frozen=True)
class ValueRows:
    """The value rows and the LayerNorm they read, with the output projection's columns
    that the values reach.

    - `value`: the value projection's weight, `value_axis` its axis over outputs; `rows`:
      the value rows in element order (key-value heads of `block` rows each, in the
      subclasses).
    - `ln`: the LayerNorm the projection reads; `ln_weight`: it has `γ` (read as
      `weight + ln_offset`); its `β` is required.
    - `weight`, `axis`, `weight_offset`: the output projection's weight, its input axis and
      the first column the values reach.
    """

    value: str
    value_axis: int
    rows: tuple[int, ...]
    ln: str
    ln_weight: bool
    ln_offset: float
    weight: str
    axis: int
    weight_offset: int

    def coordinates(self, state: State, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`1/γ` `(features,)` and `s = Σ β/γ` (a scalar tensor)."""
        beta = state[f"{self.ln}.bias"].to(dtype)
        gamma = (
            state[f"{self.ln}.weight"].to(dtype) + self.ln_offset
            if self.ln_weight
            else torch.ones_like(beta)
        )
        inv = 1 / gamma
        return inv, (beta * inv).sum()

    def add_to_values(self, new: State, u: Tensor) -> None:
        """`W_v[rows] += (u/s) ⊗ (1/γ)` in `new`: every token's values move by `u` `(rows,)`."""
        W = new[self.value]
        inv, s = self.coordinates(new, W.dtype)
        rows = W if self.value_axis == 0 else W.T
        idx = torch.tensor(self.rows, dtype=torch.long)
        rows = rows.index_add(0, idx, (u.to(W.dtype) / s)[:, None] * inv[None, :])
        new[self.value] = rows if self.value_axis == 0 else rows.T

    def ln_params(self) -> list[str]:
        """The LayerNorm's parameters it reads."""
        return [f"{self.ln}.weight"] * self.ln_weight + [f"{self.ln}.bias"]
