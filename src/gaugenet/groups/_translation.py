"""Additive shifts of parameters that change nothing (e.g. the key bias of softmax attention)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._base import AbstractFactor, State

__all__ = ["AdditiveFactor", "Shift", "TranslationFactor", "shifted_entries"]


@dataclass(frozen=True)
class Shift:
    """`state[param][offset : offset + n] += v` (along axis 0)."""

    param: str
    offset: int

    def __call__(self, new: State, v: Tensor) -> None:
        p = new[self.param]
        n = v.shape[0]
        new[self.param] = torch.cat(
            [
                p[: self.offset],
                p[self.offset : self.offset + n] + v.to(p.dtype),
                p[self.offset + n :],
            ]
        )


class AdditiveFactor(AbstractFactor):
    """A factor whose group is `R^dim` under addition (elements are vectors of `dim`)."""

    def identity(self, dtype=torch.float64) -> Tensor:
        return torch.zeros(self.dim, dtype=dtype)

    def sample(self, generator=None, dtype=torch.float64, scale=0.5) -> Tensor:
        return (scale * torch.randn(self.dim, generator=generator, dtype=torch.float64)).to(dtype)

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def inverse(self, a: Tensor) -> Tensor:
        return -a

    def exp(self, xi: Tensor) -> Tensor:
        return xi

    def validate(self, a: Tensor) -> None:
        if a.shape != (self.dim,):
            raise self._fail(f"expected shape ({self.dim},), got {tuple(a.shape)}")
        self._check_finite(a)


@dataclass(eq=False)
class TranslationFactor(AdditiveFactor):
    """The additive group `R^n`. Element: `(n,)`.

    `scaled_by` declares rescaling factors that do not commute with this translation:
    `(factor_name, m)` says that acting by the shift `v` and then by the rescaling `α` equals
    acting by `α` and then by the shift `v * α[m]` (entry `m[c] == n_factor` means unscaled).
    `moved_by` does the same for matrix factors: `(factor_name, mode)` says that the shift
    `v` followed by the `GLFactor` element `g` (`(b, d, d)`) equals `g` followed by the shift
    whose `k`-th block of `d` entries is `M(g_k) v_k`, `M` as in `MatTerm` (`mode`). The
    group applies rescalings first and translations last, and composes accordingly (a
    semidirect product), see `GaugeGroup.compose`. Either declaration may carry a third
    entry: a `power` for `scaled_by` (the shift is scaled by `α[m] ** power`) and an
    `offset` for `moved_by` (the blocks start at entry `offset` of the shift, not at 0), and
    a fourth, `step`: the blocks lie `step` entries apart instead of back to back (one element
    block acting on each of several repeated blocks, as for the query heads of one key-value
    group, is one declaration per repetition), and a fifth, `sel`: the shift holds only the
    coordinates `sel` (`(m,)` long) of each block, which the element maps to themselves (the
    unrotated part of rotary heads): block `k` moves by the `sel` rows and columns of
    `M(g_k)`, its `m` entries `step` apart. The `offset` may instead be a `(b, d)` (or
    `(b, m)` with `sel`) long tensor: the entries of every block, listed (the `step` is
    then unused, `None`), for heads whose rows are not evenly spaced blocks. An
    `OrthogonalFactor`'s element `(d, d)` is one block; mode `"Tc"` moves a shift written
    in coordinates of `1^⊥` (`Bᵀ Qᵀ B`); mode `"sign"` multiplies one entry by the sign of
    the product of the element's block determinants (a shift along an oriented line).
    """

    n: int = 0
    terms: tuple[Shift, ...] = field(default=(), kw_only=True)
    scaled_by: tuple[tuple, ...] = field(default=(), kw_only=True)
    moved_by: tuple[tuple, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "translation"

    @property
    def dim(self) -> int:
        return self.n

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.param for t in self.terms))


def shifted_entries(term, state: State, n: int) -> Tensor:
    """The entries of `state[term.param]` that the additive term `term` moves, `(n,)` in
    the order of the shift's coordinates (found by acting with `1, …, n` on zeros; each
    coordinate must land on one entry of its own with coefficient 1).

    Raises `ValueError` for a term that does not add each coordinate to one entry."""
    p = state[term.param]
    probe = {term.param: torch.zeros(p.shape, dtype=torch.float64)}
    term(probe, torch.arange(1, n + 1, dtype=torch.float64))
    flat = probe[term.param].reshape(-1)
    pos = flat.nonzero().reshape(-1)
    coord = flat[pos].round().long() - 1
    whole = torch.equal(flat[pos], flat[pos].round())
    if not whole or pos.numel() != n or sorted(coord.tolist()) != list(range(n)):
        raise ValueError(f"shift on {term.param}: its {n} coordinates are not {n} entries")
    idx = torch.empty(n, dtype=torch.long)
    idx[coord] = pos
    return p.reshape(-1)[idx]
