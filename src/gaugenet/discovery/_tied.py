"""Rescalings that survive weight tying: a joint subgroup solved from the ties.

A parameter used by several layers must be multiplied by the same factor in every use. Each
use multiplies an entry by a product of scale variables (`α_row / α_col` for a linear
weight), so in log-scales `u` a tie is a set of linear equations `A u = 0`: one per entry
and per extra use. The rescalings compatible with every tie are `u = B z` with `B` a basis
of the null space of `A` over the scale classes the tied parameters touch.

Example: `W` shared by two ReLU layers (`x → W → ReLU → W → ReLU → out`), hidden scales
`α₁`, `α₂`. Entry `(i, j)` of `W` is scaled by `α₁ᵢ` in the first use and by `α₂ᵢ / α₁ⱼ` in
the second, so `α₁ = c 1`, `α₂ = c² 1`: the joint rescaling `W ↦ c W`, `b₁ ↦ c b₁`,
`b₂ ↦ c² b₂`, `out ↦ out / c²` (one dimension).

The factor's element is `z` (`(k,)`, an additive group); it acts by `α = exp(B z)` on every
term of the classes involved, writing a tied parameter once and copying it to its aliases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..groups import MonomialScaleFactor, Scale
from ..groups._base import State
from ..groups._group import parameter_aliases
from ._labels import FIXED, Labels, terms_of
from ._monomials import equations

__all__ = ["JointRescalingFactor", "tied_rescalings"]


@dataclass(frozen=True)
class Alias:
    """`state[alias] = state[source]`: one tensor under several names (tied weights)."""

    source: str
    alias: str

    def __call__(self, new: State, alpha_ext: Tensor) -> None:
        new[self.alias] = new[self.source]


@dataclass(eq=False)
class JointRescalingFactor(MonomialScaleFactor):
    """`R^k`: rescalings `α = exp(B z)` of `m` scale classes constrained by weight ties
    (a `MonomialScaleFactor`: element `z`, `(k,)`; `basis` `B`, `(m, k)`), writing a tied
    parameter once and copying it to its aliases."""


def _exponents(recs: list[tuple[Tensor, int]], shape: torch.Size, colmap: Tensor, m: int) -> Tensor:
    """Per entry of a parameter of `shape`, the exponent of every scale class: `(entries, m)`
    (`colmap`: scale class root -> column, `-1` for classes not involved)."""
    n = math.prod(shape)
    out = torch.zeros(n, m + 1, dtype=torch.float64)
    for roots, power in recs:
        c = colmap[roots.expand(shape).reshape(-1)]
        c = torch.where(c < 0, m, c)
        out.index_put_(
            (torch.arange(n), c),
            torch.full((n,), float(power), dtype=torch.float64),
            accumulate=True,
        )
    return out[:, :m]


#: ties whose constraint matrix would exceed this many entries are not solved (their
#: symmetries stay dropped, with the tie as breaker)
MAX_CONSTRAINTS = 20_000_000


def tied_rescalings(L: Labels, model: nn.Module) -> list[JointRescalingFactor]:
    """The joint rescalings compatible with every tie of `model` (see the module doc).
    Call before the ties fix their labels."""
    aliases = parameter_aliases(model)
    ties = [
        names
        for pid, uses in L.param_users.items()
        if len({node for _, node in uses}) > 1
        for names in [aliases.get(pid, [])]
        if names
    ]
    if not ties:
        return []
    # the root of every label; the extra last entry is what the ZERO label (-1) indexes
    find = L.roots()

    def roots(ids: Tensor) -> Tensor:
        return find[ids]

    # scale classes touched by the tied parameters (FIXED ones are constants)
    involved: set[int] = set()
    for rec in L.scale_terms:
        if rec[0] != "bnshift" and any(rec[0] in names for names in ties):
            involved |= {int(v) for v in roots(rec[1]).unique() if int(v) != FIXED}
    if not involved:
        return []
    # product and power equations (`_monomials.py`) reaching these classes join the system
    eqs = _reaching(equations(L) if L.mono else [], involved)
    col = {r: k for k, r in enumerate(sorted(involved))}
    colmap = torch.full((len(L.parent),), -1, dtype=torch.long)
    for r, k in col.items():
        colmap[r] = k
    shapes = dict(model.named_parameters(remove_duplicate=False))
    size = sum(shapes[n].numel() * (len(names) - 1) for names in ties for n in names[:1])
    if size * len(col) > MAX_CONSTRAINTS:
        return []
    rows, later = [], set()
    for names in ties:
        uses = _uses(L, names)
        per_use = []
        for name, ks in uses:
            recs = [(roots(L.scale_terms[k][1]), L.scale_terms[k][2]) for k in ks]
            per_use.append(_exponents(recs, shapes[name].shape, colmap, len(col)))
        rows += [torch.unique(u - per_use[0], dim=0) for u in per_use[1:]]
        later |= {k for _, ks in uses[1:] for k in ks}
    for row in eqs:
        dense = torch.zeros(1, len(col), dtype=torch.float64)
        for r, e in row.items():
            dense[0, col[r]] = float(e)
        rows.append(dense)
    A = torch.cat(rows)
    _, s, vh = torch.linalg.svd(A, full_matrices=True)
    rank = int((s > 1e-9 * max(1.0, float(s.max()) if s.numel() else 1.0)).sum())
    basis = vh[rank:].T.contiguous()  # (m, k)
    if basis.shape[1] == 0:
        return []
    # every term touching the involved classes; a tied parameter is written once
    lut = torch.full((len(L.parent) + 1,), len(col), dtype=torch.long)
    for r, k in col.items():
        lut[find == r] = k
    # a tied parameter is written once, through its first use
    first = [rec for k, rec in enumerate(L.scale_terms) if k not in later]
    terms = terms_of(first, lut, len(col))
    terms += [Alias(names[0], a) for names in ties for a in names[1:]]
    scaled = [t.param for t in terms if isinstance(t, Scale)]
    modules = tuple(dict.fromkeys(p.rpartition(".")[0] for p in scaled))
    name = "scale:tied:" + "+".join(names[0] for names in ties)
    # every class solved here is this factor's (the tied ones are fixed later by the ties)
    L.claimed |= {i for i, r in enumerate(find.tolist()[:-1]) if r in col}
    for r in col:
        L.union(FIXED, r)
    return [JointRescalingFactor(name, basis=basis, terms=tuple(terms), modules=modules)]


def _uses(L: Labels, names: list[str]) -> list[tuple[str, list[int]]]:
    """The uses of one tied tensor, `(name, record indices)`, per name in the order of
    `names` and per graph node that recorded scale terms for it (a module called twice: one
    name, two nodes). A name with no records is one use with none (its entries keep scale
    1); the first use is the one the factor writes, the aliases copy it."""
    out: list[tuple[str, list[int]]] = []
    for name in names:
        per_node: dict[str | None, list[int]] = {}
        for k, rec in enumerate(L.scale_terms):
            if rec[0] == name:
                per_node.setdefault(L.term_node.get(k), []).append(k)
        out += [(name, ks) for ks in per_node.values()] or [(name, [])]
    return out


def _reaching(eqs: list[dict], involved: set[int]) -> list[dict]:
    """The equations connected to the classes `involved` (which grows to every class they
    reach)."""
    out, rest, grown = [], list(eqs), True
    while grown:
        grown = False
        for row in list(rest):
            if involved & row.keys():
                involved.update(row)
                out.append(row)
                rest.remove(row)
                grown = True
    return out
