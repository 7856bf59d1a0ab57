"""Entries no output reads: any change of them is a symmetry.

A parameter that no operation of the captured graph reads, or that only operations whose
results never reach an output read, and the rows of a table that the graph only looks up at
constant indices that never select them, can be moved anywhere: the group is `R^k` acting
by `θ_S ↦ θ_S + z` on those `k` entries. Its natural gauge sets them to zero, and its
Noether charge is the entries themselves: the loss gradient on them is zero, so gradient
flow never moves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._base import State
from ._translation import TranslationFactor

__all__ = ["FreeFactor", "FreeRows"]


def _as_rows(p: Tensor) -> Tensor:
    """`p` as `(rows, width)`: axis 0 against the rest (a scalar is one row of one entry)."""
    return p.reshape(p.shape[0] if p.ndim else 1, -1)


@dataclass(frozen=True, eq=False)
class FreeRows:
    """`state[param][rows] += v[offset : offset + len(rows) * width]`, read as
    `(len(rows), width)`: rows along axis 0 (a 0- or 1-d parameter has one entry per row).

    - `rows`: `(k,)` long, distinct row indices.
    - `width`: entries per row (`prod(shape[1:])`).
    """

    param: str
    rows: Tensor
    width: int
    offset: int = 0

    @property
    def size(self) -> int:
        return int(self.rows.numel()) * self.width

    def __call__(self, new: State, v: Tensor) -> None:
        p = new[self.param]
        part = v[self.offset : self.offset + self.size].to(p.dtype)
        flat = _as_rows(p).index_add(0, self.rows, part.reshape(-1, self.width))
        new[self.param] = flat.reshape(p.shape)

    def entries(self, state: State) -> Tensor:
        """The entries it moves, flattened `(len(rows) * width,)`."""
        return _as_rows(state[self.param])[self.rows].reshape(-1)


@dataclass(eq=False)
class FreeFactor(TranslationFactor):
    """`R^n`: additive translations of entries that no output reads (kind `"free"`).
    Element `(n,)`: the terms' entries back to back, each term's rows in order.

    It commutes with every other factor of a discovered group: discovery claims entries only
    where no other factor acts on them but by translation (see `discovery/_unread.py`)."""

    terms: tuple[FreeRows, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "free"
        size = sum(t.size for t in self.terms)
        if size != self.n:
            raise self._fail(f"its terms move {size} entries, not n = {self.n}")

    def entries(self, state: State) -> Tensor:
        """The entries it moves, `(n,)`, in element order; the Noether charge (gradient
        flow leaves them where they are)."""
        if not self.terms:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([t.entries(state) for t in self.terms])

    def canonical(self, state: State) -> Tensor:
        """The element setting every entry to zero: the natural gauge."""
        return -self.entries(state)
