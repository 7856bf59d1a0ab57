"""The `GL(d)` of a residual stream that no normalization reads.

A stream that starts at an embedding table, is written by linear maps and other tables
(`_stream.py`), and is read only by linear maps, with nothing between (no LayerNorm, no RMS
normalization, no nonlinearity, not the model's output), keeps its function under any
invertible `G`: with the tokens' features as rows, `h ↦ h G` when

- every table turns, `E ↦ E G` (its rows are what the stream starts from or adds);
- every writer's outputs turn, `W ↦ Gᵀ W`, `b ↦ Gᵀ b` (`W` `(d, in)`; `W ↦ W G` for a
  weight stored `(in, d)`);
- every reader takes it back, `W ↦ W G⁻ᵀ` (`W` `(m, d)`; `W ↦ G⁻¹ W` for `(d, m)`).

What the contributors write may also shift (`TokenShiftFactor`): `c_k v` added to every row
of each table and to each writer's bias, where every reader without bias sees none of it
(`Σ c_k = 0` over the contributors reaching it) and every reader with a bias takes back what
it sees (`b_r ↦ b_r − s_r W_r v`); an exact basis of such `c`, each `R^d`.

This is the residual network's version of the paper's gauge transformation at a constant
`G` (the discrete `w̄ ↦ G⁻¹ w̄ G`), the group that the `O(d)` of a normalized stream is the
remnant of. Its canonical form reads the table alone (no other factor moves it): `E G`
with orthonormal columns (`Gᵀ EᵀE G = 1`), then the rotation left, to the eigenvectors of
the fourth moments `Σ_i |z_i|² z_i z_iᵀ` of the whitened rows `z_i`, by decreasing
eigenvalue, each signed so that its column of `E G` has a positive third moment: one point
per orbit for tables of full column rank with distinct such eigenvalues.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

from ..groups import TranslationFactor
from ..groups._base import State
from ..groups._canonical_hooks import register_canonicalizer
from ..groups._matrix import GLFactor, MatTerm
from ._linear import Linear
from ._monomials import null_space

__all__ = ["StreamGLFactor", "TokenShift", "TokenShiftFactor", "stream_gl", "with_key_rows"]


@dataclass(eq=False)
class StreamGLFactor(GLFactor):
    """`GL(d)` of one residual stream read only by linear maps (element `(1, d, d)`)."""

    #: the embedding table `(vocab, d)` the stream starts from (as `OrthogonalFactor`'s)
    table: str | None = field(default=None, kw_only=True)
    table_axis: int = field(default=1, kw_only=True)
    table_block: tuple[int, int] | None = field(default=None, kw_only=True)

    #: the shifts of what the stream's contributors write (`TokenShiftFactor`), added
    #: beside it
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
class TokenShift:
    """Adds `c_k v` to what each contributor writes into the stream (every row of a table,
    or a writer's bias) and takes the change each biased reader sees back from its bias:
    `b_r ↦ b_r − s_r W_r v`, `s_r` the sum of the coefficients of the contributors reaching
    it. `adds`: `(param, is_table, c_k)`; `absorbs`: `(weight, bias, in_axis, s_r)`;
    `keys`: per bias, the entry ranges that feed softmax keys, left alone (a constant on
    every key moves each query's scores by one number, which softmax removes; leaving them
    keeps the shift commuting with the query-key `GL`, which does not move the key bias)."""

    adds: tuple[tuple[str, bool, float], ...]
    absorbs: tuple[tuple[str, str, int, float], ...]
    keys: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()

    def __call__(self, new: State, v: Tensor) -> None:
        for param, table, c in self.adds:
            p = new[param]
            new[param] = p + c * (v.to(p.dtype)[None, :] if table else v.to(p.dtype))
        skip = dict(self.keys)
        for weight, bias, in_axis, c in self.absorbs:
            w = new[weight]
            wv = w @ v.to(w.dtype) if in_axis == 1 else v.to(w.dtype) @ w
            for lo, hi in skip.get(bias, ()):
                wv = torch.cat([wv[:lo], torch.zeros_like(wv[lo:hi]), wv[hi:]])
            new[bias] = new[bias] - c * wv.to(new[bias].dtype)


@dataclass(eq=False)
class TokenShiftFactor(TranslationFactor):
    """`R^d`: one shift of what a normalization-free stream's contributors write
    (`TokenShift`), as one vector of an exact basis of the shifts that the readers without
    bias do not see; the stream's `GL` moves it as it turns the rows (`v ↦ Gᵀ v`)."""

    def params(self) -> tuple[str, ...]:
        t = self.terms[0]
        return tuple(dict.fromkeys([*(a[0] for a in t.adds), *(a[1] for a in t.absorbs)]))

    def canonical(self, state: State) -> Tensor:
        """The shift that zeroes its own contributor (coefficient 1, which no other basis
        vector moves): a writer's bias, or a table's first row (every `G` keeps zero)."""
        param, table, c = self.terms[0].adds[0]
        p = state[param].double()
        return -(p.reshape(-1, p.shape[-1])[0] if table else p) / c


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
    reach: list[tuple[bool, ...]],
    axes: dict[str, int] | None = None,
) -> StreamGLFactor:
    """The factor of a stream starting at `table` `(vocab, d)`, with the added `tables`, the
    `writers` and the `readers` (see the module), and its shifts (`TokenShiftFactor`):
    `reach[r][k]` says whether contributor `k` (the tables, `table` first, then the writers)
    reaches reader `r`; `axes`: the feature axis of each added table (default 1)."""
    axes = axes or {}
    terms = [MatTerm(t, axes.get(t, 1), 0, "T") for t in (table, *tables)]
    for w in writers:
        terms.append(MatTerm(w.weight, w.out_axis, 0, "T"))
        if w.bias is not None:
            terms.append(MatTerm(w.bias, 0, 0, "T"))
    terms += [MatTerm(r.weight, r.in_axis, 0, "inv") for r in readers]
    gl_name = f"stream_gl:{name}"
    shifts = _token_shifts(gl_name, d, [table, *tables], writers, readers, reach)
    return StreamGLFactor(
        gl_name, d, 1, terms=tuple(terms), modules=mods, table=table, moves=tuple(shifts)
    )


def _token_shifts(
    gl_name: str,
    d: int,
    tables: list[str],
    writers: list[Linear],
    readers: list[Linear],
    reach: list[tuple[bool, ...]],
) -> list[TokenShiftFactor]:
    """One factor per vector of an exact basis of the contributors' coefficients `c` with
    `Σ_{k reaching r} c_k = 0` for every reader `r` without bias (writers without bias add
    nothing); free coefficients in order, so that each vector's own contributor comes
    first."""
    contributors = [(t, True) for t in tables] + [(w.bias, False) for w in writers]
    cols = [k for k, (p, _) in enumerate(contributors) if p is not None]
    rows = [
        {k: Fraction(1) for k in cols if reach[r][k]}
        for r, lin in enumerate(readers)
        if lin.bias is None
    ]
    out = []
    basis = null_space([r for r in rows if r], cols)
    for vec in basis:
        # its free coefficient: 1 here, absent from every other basis vector
        own = next(
            k for k in cols if vec.get(k) == 1 and not any(k in o for o in basis if o is not vec)
        )
        order = [own, *(k for k in cols if k != own and vec.get(k))]
        adds = tuple((contributors[k][0], contributors[k][1], float(vec[k])) for k in order)
        absorbs = []
        for r, lin in enumerate(readers):
            total = float(sum(vec.get(k, 0) for k in cols if reach[r][k]))
            if total:
                absorbs.append((lin.weight, lin.bias, lin.in_axis, total))
        name = contributors[own][0]
        out.append(
            TokenShiftFactor(
                f"token_shift:{name}",
                d,
                terms=(TokenShift(adds, tuple(absorbs)),),
                moved_by=((gl_name, "T"),),
                modules=tuple(dict.fromkeys(p.rpartition(".")[0] for p, *_ in adds)),
            )
        )
    return out


def with_key_rows(factors: list, keys: dict[str, list[tuple[int, int]]]) -> list:
    """`factors` with every `TokenShiftFactor` leaving the softmax key entries of the biases
    it writes alone (`keys`: per bias, the entry ranges a key shift moves)."""
    out = []
    for f in factors:
        t = f.terms[0] if isinstance(f, TokenShiftFactor) else None
        hit = tuple((b, tuple(keys[b])) for _, b, _, _ in (t.absorbs if t else ()) if b in keys)
        if hit:
            f = dataclasses.replace(f, terms=(dataclasses.replace(t, keys=hit),))
        out.append(f)
    return out
