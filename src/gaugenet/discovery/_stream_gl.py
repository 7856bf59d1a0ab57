"""The `GL(d)` of a residual stream that no normalization reads.

A stream that starts at an embedding table, is written by linear maps and other tables
(`_stream.py`), and is read only by linear maps, with nothing between (no LayerNorm, no RMS
normalization, no nonlinearity, not the model's output), keeps its function under any
invertible `G`: with the tokens' features as rows, `h ↦ h G` when

- every table turns, `E ↦ E G` (its rows are what the stream starts from or adds);
- every writer's outputs turn, `W ↦ Gᵀ W`, `b ↦ Gᵀ b` (`W` `(d, in)`; `W ↦ W G` for a
  weight stored `(in, d)`);
- every reader takes it back, `W ↦ W G⁻ᵀ` (`W` `(m, d)`; `W ↦ G⁻¹ W` for `(d, m)`).

This is the residual network's version of the paper's gauge transformation at a constant
`G` (the discrete `w̄ ↦ G⁻¹ w̄ G`), the group that the `O(d)` of a normalized stream is the
remnant of. Its canonical form reads the table alone (no other factor moves it): `E G`
with orthonormal columns (`Gᵀ EᵀE G = 1`), then the rotation left, to the eigenvectors of
the fourth moments `Σ_i |z_i|² z_i z_iᵀ` of the whitened rows `z_i`, by decreasing
eigenvalue, each signed so that its column of `E G` has a positive third moment: one point
per orbit for tables of full column rank with distinct such eigenvalues.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..groups import TranslationFactor
from ..groups._base import State
from ..groups._canonical_hooks import register_canonicalizer
from ..groups._matrix import GLFactor, MatTerm
from ._linear import Linear

__all__ = ["StreamGLFactor", "StreamTableMove", "TableMove", "stream_gl"]


@dataclass(eq=False)
class StreamGLFactor(GLFactor):
    """`GL(d)` of one residual stream read only by linear maps (element `(1, d, d)`)."""

    #: the embedding table `(vocab, d)` the stream starts from (as `OrthogonalFactor`'s)
    table: str | None = field(default=None, kw_only=True)
    table_axis: int = field(default=1, kw_only=True)
    table_block: tuple[int, int] | None = field(default=None, kw_only=True)

    #: vectors moved between the stream's tables (`StreamTableMove`), added beside it
    moves: tuple = field(default=(), kw_only=True)
    #: its canonical form reads only the tables, which no rescaling touches: it is fixed
    #: before the rescalings are balanced (`_canonical.py`), so their balance does not
    #: depend on the point of the stream's orbit
    canonical_first: bool = field(default=True, kw_only=True)

    def canonical_element(self, state: State) -> Tensor:
        """`G` whitening the table, then rotating it to the principal axes of its fourth
        moments (see the module); the identity when the table is rank deficient."""
        e = state[self.table].double()
        evals, evecs = torch.linalg.eigh(e.T @ e)
        if float(evals[0]) <= 1e-12 * float(evals[-1]):
            return self.identity(torch.float64)
        w = evecs * evals.rsqrt()  # (E w)ᵀ(E w) = 1
        z = e @ w
        k = (z * (z * z).sum(1, keepdim=True)).T @ z  # Σ_i |z_i|² z_i z_iᵀ
        _, u = torch.linalg.eigh(k)
        g = w @ u.flip(-1)
        sign = torch.sign(((e @ g) ** 3).sum(0))
        sign[sign == 0] = 1
        return (g * sign)[None]


@dataclass(frozen=True)
class TableMove:
    """`to[i] += v` for every row `i`, `from_[j] −= v` for every row `j`: two tables whose
    rows are summed, one of each per token, keep every sum."""

    to: str
    from_: str

    def __call__(self, new: State, v: Tensor) -> None:
        new[self.to] = new[self.to] + v.to(new[self.to].dtype)[None, :]
        new[self.from_] = new[self.from_] - v.to(new[self.from_].dtype)[None, :]


@dataclass(eq=False)
class StreamTableMove(TranslationFactor):
    """`R^d`: a vector moved between two tables summed into a stream with no normalization
    (`TableMove`); the stream's `GL` moves it as it turns the tables' rows (`v ↦ Gᵀ v`)."""

    def params(self) -> tuple[str, ...]:
        t = self.terms[0]
        return (t.to, t.from_)

    def canonical(self, state: State) -> Tensor:
        """The move that leaves the source table's mean row zero (a condition every `G`
        keeps)."""
        return state[self.terms[0].from_].double().mean(0)


def _canonical(f: StreamGLFactor, state: State) -> Tensor:
    return f.canonical_element(state)


register_canonicalizer(StreamGLFactor, _canonical)


def stream_gl(
    name: str,
    d: int,
    table: str,
    tables: list[str],
    writers: list[Linear],
    readers: list[Linear],
    mods: tuple[str, ...],
) -> StreamGLFactor:
    """The factor of a stream starting at `table` `(vocab, d)`, with the added `tables`, the
    `writers` and the `readers` (see the module)."""
    terms = [MatTerm(t, 1, 0, "T") for t in (table, *tables)]
    for w in writers:
        terms.append(MatTerm(w.weight, w.out_axis, 0, "T"))
        if w.bias is not None:
            terms.append(MatTerm(w.bias, 0, 0, "T"))
    terms += [MatTerm(r.weight, r.in_axis, 0, "inv") for r in readers]
    gl_name = f"stream_gl:{name}"
    moves = tuple(
        StreamTableMove(
            f"table_move:{t}",
            d,
            terms=(TableMove(table, t),),
            moved_by=((gl_name, "T"),),
            modules=(table.rpartition(".")[0], t.rpartition(".")[0]),
        )
        for t in tables
    )
    return StreamGLFactor(gl_name, d, 1, terms=tuple(terms), modules=mods, table=table, moves=moves)
