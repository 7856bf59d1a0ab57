"""Turning propagated labels into gauge factors."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..groups import (
    Breaker,
    MonomialScaleFactor,
    PermTerm,
    PermutationFactor,
    RescalingFactor,
    Scale,
)
from ._kernel import LayerNormKernelFactor, without_tied
from ._labels import FIXED, Labels, terms_by_factor, unique_pairs
from ._monomials import monomial_factors
from ._perm_monomial import monomial_conjugates
from ._same import by_name, same_factor
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


def _scale_factors(L: Labels) -> tuple[list[RescalingFactor], Tensor, Tensor]:
    """One `RescalingFactor` per component of blocks linked by a shared free scale class,
    in the order of their smallest class root, with its classes (roots ascending) as its
    scales; and `(fac, pos)`, `(ids + 1,)`: every id's factor (`-1`: fixed; the last entry
    is the `ZERO` label's) and its scale index there.

    Vectorized over ids: a 7B-shaped model has millions (a Python int, set or dict entry
    per id costs hundreds of megabytes)."""
    n_ids = len(L.parent)
    root_t = L.roots()
    ids = (root_t[1:n_ids] != FIXED).nonzero().reshape(-1) + 1  # the free ids
    id_roots, id_blocks = root_t[ids], torch.tensor(L.block_of)[ids]
    classes, class_of = torch.unique(id_roots, return_inverse=True)  # roots, ascending
    # components: the block of a class's first id is linked to every block the class reaches
    first = torch.full((len(classes),), len(ids)).scatter_reduce(
        0, class_of, torch.arange(len(ids)), "amin"
    )
    comp = list(range(len(L.blocks)))

    def cfind(b: int) -> int:
        while comp[b] != b:
            comp[b] = comp[comp[b]]
            b = comp[b]
        return b

    for a, b in unique_pairs(id_blocks[first][class_of], id_blocks).tolist():
        comp[cfind(b)] = cfind(a)
    comp_t = torch.tensor([cfind(b) for b in range(len(L.blocks))] or [0])
    # factors in the order of their smallest root, each holding its classes ascending
    comps, comp_of = torch.unique(comp_t[id_blocks[first]], return_inverse=True)
    start = torch.full((len(comps),), len(classes)).scatter_reduce(
        0, comp_of, torch.arange(len(classes)), "amin"
    )
    rank = torch.empty_like(start)
    rank[torch.argsort(start)] = torch.arange(len(comps))
    factor = rank[comp_of]  # (classes,)
    order = torch.argsort(factor, stable=True)
    sizes = torch.bincount(factor, minlength=len(comps))
    index = torch.empty_like(factor)
    index[order] = torch.arange(len(classes)) - (torch.cumsum(sizes, 0) - sizes)[factor[order]]
    fac = torch.full((n_ids + 1,), -1)
    pos = torch.full((n_ids + 1,), -1)
    fac[classes], pos[classes] = factor, index
    fac, pos = fac[root_t], pos[root_t]
    n_of = sizes.tolist()
    terms_of_factor = terms_by_factor(L.scale_terms, fac, pos, n_of)
    blocks: list[list[int]] = [[] for _ in n_of]
    for f, b in unique_pairs(factor[class_of], id_blocks).tolist():
        blocks[f].append(b)
    factors = []
    for n, terms, bs in zip(n_of, terms_of_factor, blocks):
        name = "scale:" + "+".join(dict.fromkeys(L.blocks[b][2] for b in bs))
        modules = tuple(
            dict.fromkeys(_module_of(t.param if isinstance(t, Scale) else t.weight) for t in terms)
        )
        labels = tuple(f"{name}[{k}]" for k in range(n))
        factors.append(RescalingFactor(name, n, terms=tuple(terms), modules=modules, labels=labels))
    return factors, fac, pos


def _perm_factors(
    L: Labels,
    scale_factors: list[RescalingFactor],
    fac: Tensor,
    pos: Tensor,
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
    # the terms and links of each space, in their order (not every one for every space)
    terms_in, links_in = _by_space(r for r, _ in located), _by_space(r for _, r, _ in linked)
    claimed, derived = _id_mask(L.claimed, len(fac)), _id_mask(L.mono_of, len(fac))
    for R in spaces:
        if L.block_fixed[R]:
            continue
        n = L.blocks[R][1]
        name = "perm:" + "+".join(
            dict.fromkeys(L.blocks[b][2] for b in range(len(L.blocks)) if L.bfind(b) == R)
        )
        terms, ok = [], True
        for t in terms_in.get(R, ()):
            (param, axis, ids), (roots_t, chans_t) = L.perm_terms[t], located[t]
            chan = torch.where(roots_t == R, chans_t, -1).reshape(ids.shape)
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
        # an up projection) are fine. Ids a factor of `_monomials.py` or `_tied.py` took
        # over count as free; a tie's (not derived) makes the conjugation unknown.
        owned: list[tuple[Tensor, Tensor, Tensor]] = []  # (factor, channel, scale index)
        for k in links_in.get(R, ()):
            sflat, roots_l, chans_l = linked[k]
            sel = (roots_l == R).nonzero().reshape(-1)
            vs, cs = sflat[sel], chans_l[sel]
            taken, fs = claimed[vs], fac[vs]
            free, fixed = ~taken & (fs >= 0), ~taken & (fs < 0)
            if bool((taken & ~derived[vs]).any()):
                ok = False
            if bool(fixed.any()) and bool(taken.any() or free.any()):
                ok = False
            owned.append((fs[free], cs[free], pos[vs][free]))
        found = _conjugates(owned, n) if ok else None
        ok = found is not None
        conjugates = [(scale_factors[f].name, m) for f, m in found or ()]
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


def _by_space(roots: Iterable[Tensor]) -> dict[int, list[int]]:
    """For each space, the indices of the located id tensors (`roots`, `-1`: none) that
    hold one of its channels, in order."""
    out: dict[int, list[int]] = defaultdict(list)
    for k, r in enumerate(roots):
        for R in torch.unique(r[r >= 0]).tolist():
            out[R].append(k)
    return out


def _id_mask(ids: Iterable[int], n: int) -> Tensor:
    """`(n,)` booleans: which label ids are in `ids`."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.tensor(list(ids), dtype=torch.long)] = True
    return mask


def _conjugates(
    owned: list[tuple[Tensor, Tensor, Tensor]], n: int
) -> list[tuple[int, Tensor]] | None:
    """`(factor, m)` for each rescaling factor the channels of a space own entries of, in
    the order they are first met: item `c` owns scale entry `m[c]`. `owned` holds `(factor,
    channel, scale index)` per linked entry. `None` when a channel owns two entries of one
    factor, or a factor's entries are not one per channel (a permutation of the channels
    would not be one of its scales)."""
    if not owned:
        return []
    f, c, k = (torch.cat(x) for x in zip(*owned))
    factors, at = torch.unique(f, return_inverse=True)
    first = torch.full((len(factors),), len(f)).scatter_reduce(0, at, torch.arange(len(f)), "amin")
    out = []
    for g in factors[torch.argsort(first)].tolist():
        sel = f == g
        pairs = unique_pairs(c[sel], k[sel])  # distinct (channel, entry), by channel
        if len(pairs) != n or not torch.equal(pairs[:, 0], torch.arange(n)):
            return None
        if len(torch.unique(pairs[:, 1])) != n:
            return None
        out.append((g, pairs[:, 1].clone()))
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


def _applied_alike(extra: list, tied: set[str], n_uses: dict[str, int]) -> list:
    """The extra factors (shifts, LayerNorm kernels, centered outputs), one per name.

    A factor derived once per application of a layer whose weights every application
    shares (ALBERT's shared layer: its LayerNorm, called once per layer, gives one kernel
    per call) is one transformation of those weights, derived for every application: it is
    kept once when all its copies are the same and they are at least as many as the
    operations that read each shared parameter it moves. Otherwise a factor that moves a
    shared parameter is dropped (a LayerNorm kernel keeps the readers nothing else reads,
    `without_tied`), as are copies that differ (a kernel whose calls have different
    readers keeps those of a call that nothing else reads: ALBERT's pooler reads the last
    call of the shared layer's last LayerNorm)."""
    out = []
    for fs in by_name(extra).values():
        f = fs[0]
        if not all(same_factor(f, g) for g in fs[1:]):
            if isinstance(f, LayerNormKernelFactor):  # each call's unshared readers
                left = [g for g in (without_tied(h, tied) for h in fs) if g is not None]
                if left and all(same_factor(left[0], g) for g in left[1:]):
                    out.append(left[0])
            continue
        shared = tied & set(f.params())
        # (each shared parameter has two uses at least: so two copies at least)
        if shared and all(n_uses[p] <= len(fs) for p in shared):
            out.append(f)
            continue
        g = without_tied(f, tied) if isinstance(f, LayerNormKernelFactor) else f
        if g is not None and not tied & set(g.params()):
            out.append(g)
    return out


def build_factors(L: Labels, model: nn.Module) -> tuple[list, list[Breaker]]:
    joint = tied_rescalings(L, model)  # before the ties fix their labels
    _fix_shared(L)
    n_uses = {
        name: len({nd for _, nd in uses}) for uses in L.param_users.values() for name, _ in uses
    }
    tied = {name for name, n in n_uses.items() if n > 1}
    extra = _applied_alike(L.extra, tied, n_uses)
    # classes linked by product and power equations (fixed afterwards), then the others
    joint += monomial_factors(L)
    scale, fac, pos = _scale_factors(L)
    monomials = [f for f in joint if isinstance(f, MonomialScaleFactor)]
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    perms = _perm_factors(L, scale, fac, pos, monomials, shapes)
    shifts = [f for f in extra if f.kind == "translation" and isinstance(f.terms[0], _BIAS_SHIFTS)]
    _scale_shifts(shifts, [*scale, *(f for f in joint if isinstance(f, MonomialScaleFactor))])
    perms = _conjugate_shifts(perms, shifts)
    breakers = list(dict.fromkeys(L.breakers))
    return [*scale, *joint, *extra, *perms], breakers
