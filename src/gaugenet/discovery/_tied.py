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
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..groups import Scale, register_canonicalizer
from ..groups._base import State
from ..groups._translation import AdditiveFactor
from ._labels import FIXED, Labels, terms_of

__all__ = ["JointRescalingFactor", "tied_rescalings"]


@dataclass(frozen=True)
class Alias:
    """`state[alias] = state[source]`: one tensor under several names (tied weights)."""

    source: str
    alias: str

    def __call__(self, new: State, alpha_ext: Tensor) -> None:
        new[self.alias] = new[self.source]


@dataclass(eq=False)
class JointRescalingFactor(AdditiveFactor):
    """`R^k`: rescalings `α = exp(B z)` of `m` scale classes constrained by weight ties.
    Element: `z`, `(k,)`; `basis` is `B`, `(m, k)`. `terms` index `α` extended by a one
    (index `m`: unscaled), as in `RescalingFactor`."""

    basis: Tensor = field(default_factory=lambda: torch.zeros(0, 0), kw_only=True)
    terms: tuple = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "rescaling"

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    def scales(self, z: Tensor) -> Tensor:
        """`α = exp(B z)`, `(m,)`."""
        return torch.exp(self.basis.to(z.dtype) @ z)

    def _term_input(self, a: Tensor) -> Tensor:
        alpha = self.scales(a)
        return torch.cat([alpha, torch.ones(1, dtype=alpha.dtype, device=alpha.device)])

    def params(self) -> tuple[str, ...]:
        out: list[str] = []
        for t in self.terms:
            if isinstance(t, Scale):
                out.append(t.param)
            elif isinstance(t, Alias):
                out += [t.source, t.alias]
            else:
                out += [t.weight, t.bias]
        return tuple(dict.fromkeys(out))


def _canonical(f: JointRescalingFactor, state: State) -> Tensor:
    """The balanced gauge: `z` minimizing the squared norm of the scaled parameters (convex
    in `z`), by Newton's method."""
    scaled = [(state[t.param].double(), t.index, t.power) for t in f.terms if isinstance(t, Scale)]
    m = f.basis.shape[0]

    def cost(z: Tensor) -> Tensor:
        alpha = torch.cat([torch.exp(f.basis.double() @ z), torch.ones(1, dtype=z.dtype)])
        return sum(((p * alpha[i] ** q) ** 2).sum() for p, i, q in scaled if (i < m).any())

    z = torch.zeros(f.dim, dtype=torch.float64)
    for _ in range(50):
        g = torch.func.grad(cost)(z)
        H = torch.func.hessian(cost)(z)
        step = torch.linalg.solve(H, g)
        z = z - step
        if float(step.abs().max()) < 1e-14 * max(1.0, float(z.abs().max())):
            break
    return z.to(next(iter(state.values())).dtype)


register_canonicalizer(JointRescalingFactor, _canonical)


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
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    # the root of every label; the extra last entry is what the ZERO label (-1) indexes
    find = torch.tensor([L.find(i) for i in range(len(L.parent))] + [FIXED])

    def roots(ids: Tensor) -> Tensor:
        return find[ids]

    ties = [
        names
        for pid, uses in L.param_users.items()
        if len({node for _, node in uses}) > 1
        for names in [aliases.get(pid, [])]
        if names
    ]
    if not ties:
        return []
    # scale classes touched by the tied parameters (FIXED ones are constants)
    involved: set[int] = set()
    for rec in L.scale_terms:
        if rec[0] != "bnshift" and any(rec[0] in names for names in ties):
            involved |= {int(v) for v in roots(rec[1]).unique() if int(v) != FIXED}
    if not involved:
        return []
    col = {r: k for k, r in enumerate(sorted(involved))}
    colmap = torch.full((len(L.parent),), -1, dtype=torch.long)
    for r, k in col.items():
        colmap[r] = k
    shapes = dict(model.named_parameters(remove_duplicate=False))
    size = sum(shapes[n].numel() * (len(names) - 1) for names in ties for n in names[:1])
    if size * len(col) > MAX_CONSTRAINTS:
        return []
    rows = []
    for names in ties:
        per_use = []
        for name in names:
            recs = [(roots(rec[1]), rec[2]) for rec in L.scale_terms if rec[0] == name]
            per_use.append(_exponents(recs, shapes[name].shape, colmap, len(col)))
        rows += [torch.unique(u - per_use[0], dim=0) for u in per_use[1:]]
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
    secondary = {n for names in ties for n in names[1:]}
    terms = terms_of(L.scale_terms, lut, len(col), skip=secondary)
    terms += [Alias(names[0], a) for names in ties for a in names[1:]]
    scaled = [t.param for t in terms if isinstance(t, Scale)]
    modules = tuple(dict.fromkeys(p.rpartition(".")[0] for p in scaled))
    name = "scale:tied:" + "+".join(names[0] for names in ties)
    return [JointRescalingFactor(name, basis=basis, terms=tuple(terms), modules=modules)]
