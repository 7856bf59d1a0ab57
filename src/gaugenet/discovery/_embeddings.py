"""Embedding tables read only by LayerNorms: their rows along `1`, and vectors moved between them.

When every path from an embedding lookup ends in a LayerNorm over the features (through
additions, casts and eval-mode dropouts: BERT's embedding sum, or a residual stream that
only LayerNorms read, as GPT-2's), two kinds of change leave every output alone:

- a row of any table moved along `1`: that token's vector moves along `1`, which the
  LayerNorm's mean subtraction removes (`R^rows` per table);
- a vector `v ⊥ 1` added to every row of one table and taken from every row of another,
  when the two lookups are summed and read nowhere else: each token reads exactly one row
  of each, so the sum is unchanged (`R^(d − 1)` per pair,
  the part along `1` being the rows' own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..groups import TranslationFactor
from ..groups._base import State
from ..groups._orthogonal import complement_basis

__all__ = [
    "CenteredRowsFactor",
    "IntoRows",
    "MoveBetweenTables",
    "MoveFromTied",
    "RowMoveFactor",
    "RowsAlongOne",
    "TableShiftFactor",
    "TiedTableShiftFactor",
    "embedding_sum_factors",
]


@dataclass(frozen=True, eq=False)
class RowsAlongOne:
    """`weight[r] += c[r] 1` for every row `r` of an embedding table `(rows, features)`, or
    for the rows `rows` (`(k,)` long) only: the others are free whole when the graph never
    reads them (see `_unread.py`), so their direction along `1` is no separate symmetry."""

    weight: str
    rows: Tensor | None = None

    def __call__(self, new: State, c: Tensor) -> None:
        W = new[self.weight]  # (..., features): every row of the leading axes
        if self.rows is None:
            new[self.weight] = W + c.to(W.dtype).reshape(*W.shape[:-1], 1)
            return
        flat = W.reshape(-1, W.shape[-1])
        along = c.to(W.dtype)[:, None].expand(-1, W.shape[-1])
        new[self.weight] = flat.index_add(0, self.rows, along).reshape(W.shape)

    def picked(self, W: Tensor) -> Tensor:
        """The rows it moves, `(k, features)`."""
        flat = W.reshape(-1, W.shape[-1])
        return flat if self.rows is None else flat[self.rows]


class CenteredRowsFactor(TranslationFactor):
    """`R^rows`: an embedding table's rows along `1`, removed by the LayerNorm of the sum."""

    def params(self) -> tuple[str, ...]:
        return (self.terms[0].weight,)

    def canonical(self, state: State) -> Tensor:
        """Rows of zero mean."""
        t = self.terms[0]
        return -t.picked(state[t.weight]).mean(1)


@dataclass(frozen=True, eq=False)
class MoveBetweenTables:
    """`to[:] += v / to_scale`, `from_[:] −= v / from_scale` for `v = B z` with `B` a basis
    of `1^⊥`, where each table's rows enter the sum times its scale (a lookup times `√d`).
    `to_rows`: the rows of `to` the graph reads (`None`: all), over which its gauge is
    taken."""

    to: str
    from_: str
    features: int
    to_rows: Tensor | None = None
    to_scale: float = 1.0
    from_scale: float = 1.0

    def __call__(self, new: State, z: Tensor) -> None:
        W = new[self.to]
        v = complement_basis(self.features, W.dtype) @ z.to(W.dtype)
        new[self.to] = W + v / self.to_scale
        new[self.from_] = new[self.from_] - (v / self.from_scale).to(new[self.from_].dtype)


class TableShiftFactor(TranslationFactor):
    """`R^(features − 1)`: a vector moved between two embedding tables whose rows are summed
    (one row of each per token)."""

    def params(self) -> tuple[str, ...]:
        t = self.terms[0]
        return (t.to, t.from_)

    def canonical(self, state: State) -> Tensor:
        """The move that leaves the target table's mean row along `1` only (the rows' own
        factor then centers it): the canonical gauge."""
        t = self.terms[0]
        W = state[t.to] if t.to_rows is None else state[t.to][t.to_rows]
        B = complement_basis(t.features, W.dtype)
        return -(B.T @ W.mean(0)) * t.to_scale


@dataclass(frozen=True, eq=False)
class MoveFromTied:
    """`from_[:] −= v` under every name of a tied table, and `to[k][:] += coef[k] v` for the
    table summed with each of its lookups (`coef[k]`: that lookup's scale over the table's),
    for `v = B z` with `B` a basis of `1^⊥`. `to_rows`: the rows of `to[0]` the graph reads
    (`None`: all), over which the gauge is taken."""

    from_: tuple[str, ...]
    to: tuple[str, ...]
    coef: tuple[float, ...]
    features: int
    to_rows: Tensor | None = None

    def __call__(self, new: State, z: Tensor) -> None:
        v = complement_basis(self.features, torch.float64) @ z.to(torch.float64)
        for name in self.from_:
            new[name] = new[name] - v.to(new[name].dtype)
        for name, c in zip(self.to, self.coef):
            new[name] = new[name] + (c * v).to(new[name].dtype)


class TiedTableShiftFactor(TranslationFactor):
    """`R^(features − 1)`: a vector moved out of a table tied under several lookups (BART's
    and Pegasus's `shared`, read by the encoder and the decoder) into the table each lookup
    is summed with (their position tables), all at once."""

    def params(self) -> tuple[str, ...]:
        """The tied table under its first name (as `CenteredRowsFactor` for a tied table:
        the other names move alike), then the target tables."""
        t = self.terms[0]
        return (t.from_[0], *t.to)

    def canonical(self, state: State) -> Tensor:
        """The move that leaves the first target table's mean row along `1` only."""
        t = self.terms[0]
        W = state[t.to[0]] if t.to_rows is None else state[t.to[0]][t.to_rows]
        B = complement_basis(t.features, W.dtype)
        return -(B.T @ W.mean(0)) / t.coef[0]


def embedding_sum_factors(
    tables: list[tuple[str, nn.Embedding]],
    sums: list[int],
    read: dict[str, Tensor] | None = None,
    scales: dict[str, float] | None = None,
) -> list:
    """The factors above for embedding tables (`(module name, module)`, each of the width the
    LayerNorms normalize) whose lookups reach only LayerNorms; `sums[i]` numbers the sum the
    `i`-th table's lookup enters (tables of one sum may exchange vectors). `read`: the rows
    the graph reads of the tables it does not read whole (by module name); `scales`: the
    number a table's rows are multiplied by in the sum (1 where not given)."""
    read, scales = read or {}, scales or {}
    out: list = [
        CenteredRowsFactor(
            f"center:{t}",
            m.num_embeddings if t not in read else len(read[t]),
            terms=(RowsAlongOne(f"{t}.weight", read.get(t)),),
            modules=(t,),
        )
        for t, m in tables
    ]
    for k in dict.fromkeys(sums):
        group = [tm for tm, s in zip(tables, sums) if s == k]
        if len(group) < 2:
            continue
        # moves out of the smallest table into each of the others
        src = min(group, key=lambda tm: tm[1].num_embeddings)[0]
        for t, m in group:
            if t == src:
                continue
            d = m.embedding_dim
            out.append(
                TableShiftFactor(
                    f"move:{src}->{t}",
                    d - 1,
                    terms=(
                        MoveBetweenTables(
                            f"{t}.weight",
                            f"{src}.weight",
                            d,
                            read.get(t),
                            scales.get(t, 1.0),
                            scales.get(src, 1.0),
                        ),
                    ),
                    modules=(t, src),
                )
            )
    return out


@dataclass(frozen=True)
class IntoRows:
    """`to += v` (every row: its last axis the features) and rows `[start, stop)` of
    `from_` (as `(-1, features)`) `−= v`, for `v = B z` with `B` a basis of `1^⊥`."""

    to: str
    from_: str
    start: int
    stop: int
    features: int

    def __call__(self, new: State, z: Tensor) -> None:
        W = new[self.to]
        v = complement_basis(self.features, W.dtype) @ z.to(W.dtype)
        new[self.to] = W + v
        P = new[self.from_]
        flat = P.reshape(-1, self.features)
        rows = torch.zeros(flat.shape[0], 1, dtype=P.dtype)
        rows[self.start : self.stop] = 1
        new[self.from_] = (flat - rows * v.to(P.dtype)).reshape(P.shape)


class RowMoveFactor(TranslationFactor):
    """`R^(features − 1)`: a vector moved from the rows of a position table that one group
    of tokens reads into what every token of that group carries (a class token, the patch
    projection's bias): each token reads one of those rows and the carrier once."""

    def params(self) -> tuple[str, ...]:
        t = self.terms[0]
        return (t.to, t.from_)

    def canonical(self, state: State) -> Tensor:
        """The move leaving those rows' mean along `1` only."""
        t = self.terms[0]
        P = state[t.from_]
        mean = P.reshape(-1, t.features)[t.start : t.stop].mean(0)
        return complement_basis(t.features, P.dtype).T @ mean
