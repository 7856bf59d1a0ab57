"""The rescalings of products and powers: one exact null-space solve per component.

Propagation leaves union-find classes of scale ids (each a log-scale variable `u_r`, `r` its
root) and the defining equations of monomial ids, `u_m = Σ e_v u_v` (`_labels.py`). Written
over roots they are sparse rational rows `A u = 0`. Classes linked by no equation keep the
fast path (`_build.py`: one `RescalingFactor` per component of blocks, unchanged). The
others split into connected components (classes sharing an equation); each component's
null space, by exact sparse Gaussian elimination over `Fraction`s, is a basis `B` scaled to
integers, and gives one `MonomialScaleFactor` acting by `α = exp(B z)` on every recorded
term of its classes. Its classes are then fixed, so that no other factor claims them again.

Example: ReGLU, `down(relu(gate(x)) ⊙ up(x))`: gate row `i` scales by `α_gᵢ`, up row `i` by
`α_vᵢ`, and the product by `α_pᵢ` with `u_pᵢ = u_gᵢ + u_vᵢ`; down's column `i` takes
`1/α_pᵢ`. Three classes and one equation per hidden unit: a null space of two per unit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction

import torch

from ..groups import MonomialScaleFactor, Scale
from ._labels import FIXED, Labels, terms_of

__all__ = ["equations", "monomial_factors", "null_space", "unscaled_index"]

Row = dict[int, Fraction]


def unscaled_index(f: object) -> int:
    """The index that a rescaling factor's terms (and `scaled_by` declarations) use for
    "not scaled": the number of its scales, `dim` for a `RescalingFactor`, the number of
    scale classes (rows of `B`) for a `MonomialScaleFactor`."""
    if isinstance(f, MonomialScaleFactor):
        return int(f.basis.shape[0])
    return int(f.dim)


def equations(L: Labels) -> list[Row]:
    """The monomial equations over union-find roots (`u_m − Σ e u_v = 0`), trivial ones
    dropped."""
    rows = []
    for m, vec in L.mono.items():
        row = L.reduced({m: Fraction(1), **{v: -e for v, e in vec.items()}})
        if row:
            rows.append(row)
    return rows


def null_space(rows: list[Row], cols: list[int]) -> list[Row]:
    """A basis of `{u : row · u = 0 for every row}` over the variables `cols`, each vector
    integer-valued (exact: sparse Gauss-Jordan elimination over the rationals)."""
    pivots: dict[int, Row] = {}  # pivot column -> its row, 1 there, 0 at other pivots
    for row in rows:
        r = dict(row)
        for p in [c for c in r if c in pivots]:
            f = r.get(p, Fraction(0))
            if f:
                for c, e in pivots[p].items():
                    r[c] = r.get(c, Fraction(0)) - f * e
        r = {c: e for c, e in r.items() if e != 0}
        if not r:
            continue
        p = min(r)
        r = {c: e / r[p] for c, e in r.items()}
        for q, other in pivots.items():
            f = other.get(p)
            if f:
                for c, e in r.items():
                    other[c] = other.get(c, Fraction(0)) - f * e
                pivots[q] = {c: e for c, e in other.items() if e != 0}
        pivots[p] = r
    basis = []
    for f in (c for c in cols if c not in pivots):
        vec = {f: Fraction(1)}
        for p, r in pivots.items():
            if f in r:
                vec[p] = -r[f]
        scale = math.lcm(*(e.denominator for e in vec.values()))
        ints = {c: e * scale for c, e in vec.items()}
        g = math.gcd(*(int(e) for e in ints.values()))
        basis.append({c: e / g for c, e in ints.items()})
    return basis


def monomial_factors(L: Labels) -> list[MonomialScaleFactor]:
    """One `MonomialScaleFactor` per connected component of the monomial equations (none
    when a component's null space is `{0}`); every class of those components is fixed
    afterwards."""
    if not L.mono:
        return []
    L.settle()
    rows = equations(L)
    if not rows:
        return []
    comp: dict[int, int] = {}

    def cfind(r: int) -> int:
        comp.setdefault(r, r)
        while comp[r] != r:
            comp[r] = comp[comp[r]]
            r = comp[r]
        return r

    for row in rows:
        first, *rest = row
        for c in rest:
            a, b = cfind(first), cfind(c)
            if a != b:
                comp[b] = a
    groups: dict[int, list[Row]] = defaultdict(list)
    for row in rows:
        groups[cfind(next(iter(row)))].append(row)
    # one factor per set of components that share a block (a layer's channels): the
    # per-unit components of a gated MLP make one factor, their bases side by side
    solved = []
    for eqs in groups.values():
        cols = sorted({c for row in eqs for c in row})
        basis = null_space(eqs, cols)
        if basis:
            solved.append((cols, basis))
    owner: dict[int, int] = {}
    merged = list(range(len(solved)))

    def mfind(k: int) -> int:
        while merged[k] != k:
            merged[k] = merged[merged[k]]
            k = merged[k]
        return k

    for k, (cols, _) in enumerate(solved):
        for c in cols:
            b = L.block_of[c]
            if b in owner:
                merged[mfind(k)] = mfind(owner[b])
            else:
                owner[b] = k
    parts: dict[int, list[int]] = defaultdict(list)
    for k in range(len(solved)):
        parts[mfind(k)].append(k)
    root_t = L.roots()
    factors = []
    for ks in parts.values():
        cols = [c for k in ks for c in solved[k][0]]
        basis = [vec for k in ks for vec in solved[k][1]]
        f = _factor(L, cols, basis, root_t)
        if any(g.name == f.name for g in factors):
            f.name = f"{f.name}#{len(factors)}"
        factors.append(f)
        _record_elements(L, f, sorted(cols), root_t)
    # the ids these factors took over (permutations conjugating them are not followed)
    L.claimed |= {i for i, r in enumerate(root_t.tolist()[:-1]) if r in comp}
    for r in comp:
        L.union(FIXED, r)
    return factors


def _record_elements(
    L: Labels, f: MonomialScaleFactor, cols: list[int], root_t: torch.Tensor
) -> None:
    """`L.mono_of` for every id of `f`'s classes (`cols`, sorted as `f.basis`' rows)."""
    row_of = torch.full((int(root_t.max()) + 1,), -1, dtype=torch.long)
    row_of[torch.tensor(cols)] = torch.arange(len(cols))
    rows = row_of[root_t[:-1]]
    for i in (rows >= 0).nonzero().flatten().tolist():
        L.mono_of[i] = f.name


def _factor(
    L: Labels, cols: list[int], basis: list[Row], root_t: torch.Tensor
) -> MonomialScaleFactor:
    m = len(cols)
    B = torch.zeros(m, len(basis), dtype=torch.float64)
    at = {c: k for k, c in enumerate(cols)}
    for j, vec in enumerate(basis):
        for c, e in vec.items():
            B[at[c], j] = float(e)
    order = sorted(range(m), key=lambda k: cols[k])
    cols = [cols[k] for k in order]
    B = B[order]
    rank = torch.full((len(L.parent),), m, dtype=torch.long)
    rank[torch.tensor(cols)] = torch.arange(m)
    lut = rank[root_t]
    terms = terms_of(L.scale_terms, lut, m)
    nodes = dict.fromkeys(L.blocks[L.block_of[c]][2] for c in cols)
    name = "monomial:" + "+".join(nodes)
    modules = tuple(
        dict.fromkeys(
            (t.param if isinstance(t, Scale) else t.weight).rpartition(".")[0] for t in terms
        )
    )
    labels = tuple(f"{L.blocks[L.block_of[c]][2]}[{c - L.blocks[L.block_of[c]][0]}]" for c in cols)
    return MonomialScaleFactor(name, basis=B, terms=tuple(terms), modules=modules, labels=labels)
