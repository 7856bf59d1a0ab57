"""Turning propagated labels into gauge factors."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..groups import (
    Breaker,
    MonomialScaleFactor,
    PermTerm,
    PermutationFactor,
    RescalingFactor,
    Scale,
)
from ._labels import FIXED, Labels, terms_of
from ._monomials import monomial_factors
from ._perm_monomial import monomial_conjugates
from ._shifts import IntoBatchNorm, IntoLinears
from ._tied import tied_rescalings

#: shifts of one layer's bias (the LayerNorm kernels and centered outputs are linked to the
#: whole group later, see `_kernel.py` and `_centering.py`)
_BIAS_SHIFTS = (IntoBatchNorm, IntoLinears)

__all__ = ["build_factors"]


def _module_of(param: str) -> str:
    return param.rpartition(".")[0]


def _fix_shared(L: Labels) -> None:
    """A parameter used by several operations (tied weights) must transform the same way for
    each use; the analysis does not solve for that and drops every symmetry touching it."""
    for uses in L.param_users.values():
        nodes = sorted({node for _, node in uses})
        if len(nodes) < 2:
            continue
        names = {name for name, _ in uses}
        reason = f"weight shared by {', '.join(nodes)} (tied weights)"
        for rec in L.scale_terms:
            if rec[0] in names:
                L.fix_scales(rec[1], nodes[0], reason)
            elif rec[0] == "bnshift" and f"{rec[1]}.weight" in names:
                L.fix_scales(rec[3], nodes[0], reason)
        for q, _, ids in L.perm_terms:
            if q in names:
                L.fix_perms(ids, nodes[0], reason)


def _scale_factors(
    L: Labels, model: nn.Module
) -> tuple[list[RescalingFactor], dict[int, tuple[str, int]]]:
    n_ids = len(L.parent)
    roots = [L.find(i) for i in range(n_ids)]
    # components: blocks linked by a shared free scale class
    comp = list(range(len(L.blocks)))

    def cfind(b: int) -> int:
        while comp[b] != b:
            comp[b] = comp[comp[b]]
            b = comp[b]
        return b

    first_block: dict[int, int] = {}
    for i in range(1, n_ids):
        r = roots[i]
        if r == FIXED:
            continue
        b = L.block_of[i]
        if r in first_block:
            comp[cfind(b)] = cfind(first_block[r])
        else:
            first_block[r] = b
    classes: dict[int, list[int]] = defaultdict(list)  # component -> roots
    for r in sorted(first_block):
        classes[cfind(first_block[r])].append(r)
    factors, where = [], {}
    # computed once, not per class (both would cost classes × ids, hours for a 7B model)
    root_t = torch.tensor([*roots, FIXED])
    blocks_of: dict[int, set[int]] = defaultdict(set)
    for i in range(1, n_ids):
        blocks_of[roots[i]].add(L.block_of[i])
    for class_roots in classes.values():
        n = len(class_roots)
        for k, r in enumerate(class_roots):
            where[r] = (len(factors), k)
        # id -> entry of this factor (n: not in it); the last index is ZERO (-1)
        rank = torch.full((n_ids,), n, dtype=torch.long)
        rank[torch.tensor(class_roots)] = torch.arange(n)
        lut = rank[root_t]
        terms = terms_of(L.scale_terms, lut, n)
        blocks = sorted({b for r in class_roots for b in blocks_of[r]})
        name = "scale:" + "+".join(dict.fromkeys(L.blocks[b][2] for b in blocks))
        modules = tuple(
            dict.fromkeys(_module_of(t.param if isinstance(t, Scale) else t.weight) for t in terms)
        )
        labels = tuple(f"{name}[{k}]" for k in range(n))
        factors.append(RescalingFactor(name, n, terms=tuple(terms), modules=modules, labels=labels))
    return factors, where


def _perm_factors(
    L: Labels,
    scale_factors: list[RescalingFactor],
    where: dict[int, tuple[str, int]],
    monomials: list[MonomialScaleFactor],
    shapes: dict[str, torch.Size],
) -> list[PermutationFactor]:
    spaces = sorted({L.bfind(b) for b in range(len(L.blocks))})
    out = []
    # (space, channel) of every perm id of every term and link, once and as tensors (not
    # id by id once per space: millions of lookups for a 7B model)
    block_t = torch.tensor(L.block_of).clamp_min(0)
    root_t = torch.tensor([L.bfind(b) for b in range(len(L.blocks))] or [0])
    base_t = torch.tensor([b[0] for b in L.blocks] or [0])

    def locate(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ids.reshape(-1)
        b = block_t[ids.clamp_min(0)]
        live = ids > 0
        return torch.where(live, root_t[b], -1), torch.where(live, ids - base_t[b], -1)

    located = [locate(ids) for _, _, ids in L.perm_terms]
    linked = [(sids.reshape(-1), *locate(pids)) for sids, pids in L.links]
    for R in spaces:
        if L.block_fixed[R]:
            continue
        n = L.blocks[R][1]
        name = "perm:" + "+".join(
            dict.fromkeys(L.blocks[b][2] for b in range(len(L.blocks)) if L.bfind(b) == R)
        )
        terms, ok = [], True
        for (param, axis, ids), (roots_t, chans_t) in zip(L.perm_terms, located):
            chan = torch.where(roots_t == R, chans_t, -1).reshape(ids.shape)
            if (chan < 0).all():
                continue
            counts = torch.bincount(chan[chan >= 0], minlength=n)
            if not (counts == counts[0]).all():
                ok = False
                break
            order = torch.argsort(chan * len(chan) + torch.arange(len(chan)))
            entries = order[(chan[order] >= 0)].reshape(n, -1)
            terms.append(PermTerm(param, axis, entries))
        if not ok:
            continue
        # conjugation with rescaling factors: item c owns scale entry m[c]
        # A tensor's scales on these channels are either all fixed (a permutation moves
        # ones onto ones) or all free; each free factor must see every channel once, so a
        # permutation of the channels is a permutation of its scales. Channels with fixed
        # scales in one tensor and free ones in another (a gate after a nonlinearity times
        # an up projection) are fine.
        maps: dict[int, dict[int, int]] = defaultdict(dict)
        for sflat, roots_l, chans_l in linked:
            sel = (roots_l == R).nonzero().reshape(-1)
            fixed_here = free_here = False
            for v, c in zip(sflat[sel].tolist(), chans_l[sel].tolist()):
                if v in L.claimed:
                    if v not in L.mono_of:  # a tie's joint factor: its conjugation is not derived
                        ok = False
                    free_here = True
                    continue
                root = L.find(v)
                if root == FIXED:
                    fixed_here = True
                    continue
                free_here = True
                f, k = where[root]
                if maps[f].get(c, k) != k:
                    ok = False
                maps[f][c] = k
            if fixed_here and free_here:
                ok = False
        conjugates = []
        for f, mp in maps.items():
            if len(mp) != n or len(set(mp.values())) != n:
                ok = False
                break
            conjugates.append((scale_factors[f].name, torch.tensor([mp[c] for c in range(n)])))
        # the entries of `z` each item owns, from each exponent factor's basis (checked)
        for f in monomials if ok else ():
            if not set(f.params()) & {t.param for t in terms}:
                continue
            mc = monomial_conjugates(terms, n, f, shapes)
            if mc is None:
                ok = False
                break
            conjugates += mc
        if not ok or not terms:
            continue
        modules = tuple(dict.fromkeys(_module_of(t.param) for t in terms))
        out.append(
            PermutationFactor(
                name, n, terms=tuple(terms), conjugates=tuple(conjugates), modules=modules
            )
        )
    return out


def _conjugate_shifts(perms: list[PermutationFactor], shifts: list) -> list[PermutationFactor]:
    """Permuting a layer's channels re-indexes the bias shift of that layer too."""
    out = []
    for f in perms:
        extra = []
        for sh in shifts:
            bias = sh.terms[0].param
            t = next((t for t in f.terms if t.param == bias and t.axis == 0), None)
            if t is not None and t.entries.shape[1] == 1:
                extra.append((sh.name, t.entries[:, 0]))
        if extra:
            f = PermutationFactor(
                f.name,
                f.n,
                terms=f.terms,
                conjugates=tuple(f.conjugates) + tuple(extra),
                modules=f.modules,
            )
        out.append(f)
    return out


def _scale_shifts(shifts: list, scale: list[RescalingFactor | MonomialScaleFactor]) -> None:
    """A bias shift and the rescaling of the same channels do not commute: record which
    rescaling scales each shift, so that the group composes them correctly."""
    for sh in shifts:
        bias = sh.terms[0].param
        for f in scale:
            t = next((t for t in f.terms if isinstance(t, Scale) and t.param == bias), None)
            if t is not None and t.power == 1:
                sh.scaled_by = (*sh.scaled_by, (f.name, t.index.reshape(-1)))


def build_factors(L: Labels, model: nn.Module) -> tuple[list, list[Breaker]]:
    joint = tied_rescalings(L, model)  # before the ties fix their labels
    _fix_shared(L)
    tied = {
        name
        for uses in L.param_users.values()
        if len({nd for _, nd in uses}) > 1
        for name, _ in uses
    }
    extra = [f for f in L.extra if not tied & set(f.params())]
    # classes linked by product and power equations (fixed afterwards), then the others
    joint += monomial_factors(L)
    scale, where = _scale_factors(L, model)
    monomials = [f for f in joint if isinstance(f, MonomialScaleFactor)]
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    perms = _perm_factors(L, scale, where, monomials, shapes)
    shifts = [f for f in extra if f.kind == "translation" and isinstance(f.terms[0], _BIAS_SHIFTS)]
    _scale_shifts(shifts, [*scale, *(f for f in joint if isinstance(f, MonomialScaleFactor))])
    perms = _conjugate_shifts(perms, shifts)
    breakers = list(dict.fromkeys(L.breakers))
    return [*scale, *joint, *extra, *perms], breakers
