"""Permutations of units, channels or heads: discrete gauge symmetries (paper footnote 9)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._base import AbstractFactor, State

__all__ = ["PermTerm", "PermutationFactor"]


@dataclass(frozen=True)
class PermTerm:
    """Permute the entries of `param` along `axis`.

    `entries` has shape `(n, m)`: the `m` indices along `axis` that belong to item `c`
    (a channel followed by flatten owns several features, a head owns `head_dim` rows).
    After the action, item `c`'s entries hold what item `p[c]`'s entries held.
    """

    param: str
    axis: int
    entries: Tensor

    def __call__(self, new: State, p: Tensor) -> None:
        x = new[self.param]
        idx = torch.arange(x.shape[self.axis])
        idx[self.entries.reshape(-1)] = self.entries[p].reshape(-1)
        new[self.param] = x.index_select(self.axis, idx)


@dataclass(eq=False)
class PermutationFactor(AbstractFactor):
    """The symmetric group on `n` items. Element: a long tensor `p` of shape `(n,)`.

    `conjugates` lists the continuous factors whose element entries belong to the same items:
    `(factor_name, m)` says item `c` owns entry `m[c]` (axis 0) of that factor's element.
    Moving a permutation past such an element re-indexes it; `GaugeGroup.compose` uses this.
    """

    n: int = 0
    terms: tuple[PermTerm, ...] = field(default=(), kw_only=True)
    conjugates: tuple[tuple[str, Tensor], ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "permutation"

    @property
    def dim(self) -> int:
        return 0

    @property
    def discrete(self) -> bool:
        return True

    def identity(self, dtype=torch.float64) -> Tensor:
        return torch.arange(self.n)

    def sample(self, generator=None, dtype=torch.float64, scale=0.5) -> Tensor:
        return torch.randperm(self.n, generator=generator)

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return a[b]

    def inverse(self, a: Tensor) -> Tensor:
        self.validate(a)
        return torch.argsort(a)

    def validate(self, a: Tensor) -> None:
        if a.shape != (self.n,) or a.dtype not in (torch.int64, torch.int32):
            raise self._fail(
                f"expected a long tensor of shape ({self.n},), got {a.dtype} {tuple(a.shape)}"
            )
        if not torch.equal(torch.sort(a).values, torch.arange(self.n, dtype=a.dtype)):
            raise self._fail(f"{a.tolist()} is not a permutation of 0..{self.n - 1}")

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.param for t in self.terms))
