"""How a permutation of units moves past an exponent factor: which entries of `z` each unit
owns, derived from the factor's basis and checked.

A `MonomialScaleFactor` scales each parameter entry by `exp(q · B[r] z)`, `r` the entry's
class (a row of `B`), `q` its term's power. A permutation of `n` items (units, channels)
moves parameter entries between items; it commutes with the factor, up to re-indexing `z`,
when the classes and the columns of `B` can be split by item so that every item looks the
same:

- the classes at an item's entries (every permuted term, entries in order) follow the same
  pattern of repeats in every item; a class found in one item only is that item's own, a
  class found in every item or outside the permuted entries is fixed, and a class found in
  some items but not all breaks the permutation;
- a column of `B` is owned by the one item whose own classes it touches, or fixed when it
  touches none or those of every item (a column touching the own classes of some items
  but not all breaks it);
- every item has as many columns, and in the item's order (own classes as listed, owned
  columns sorted by their entries) `B` restricted to (own classes, owned columns), to (own
  classes, fixed columns) and to (fixed classes, owned columns) is the same for every item
  (exact comparisons: discovery solves `B` in small integers).

Then permuting items permutes the rows of `B` exactly as permuting the owned columns does,
so `P · act(z) = act(z') · P` with `z'` re-indexed: item `c` owns entry `m_k[c]` of `z`, one
map `m_k` per owned column of an item (the `conjugates` of `PermutationFactor`). A gated
MLP's units own two entries each (gate and up), `lin2(w ⊙ relu(lin1 x))`'s units two (the
row of `lin1` and the entry of `w`, their product following).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..groups import MonomialScaleFactor, PermTerm, Scale
from ..groups._rescaling import BatchNormShift

__all__ = ["monomial_conjugates"]


def monomial_conjugates(
    terms: tuple[PermTerm, ...] | list[PermTerm],
    n: int,
    f: MonomialScaleFactor,
    shapes: dict[str, torch.Size],
) -> list[tuple[str, Tensor]] | None:
    """The conjugates of a permutation of `n` items acting by `terms` with the factor `f`
    (`(f.name, m)`: item `c` owns entry `m[c]` of `f`'s element), `[]` when it moves none
    of `f`'s entries, `None` when it does not commute with `f` by re-indexing `z`.
    `shapes`: the parameters' shapes."""
    pairs = _indexed(f)
    moved = {(t.param, t.axis): t for t in terms}
    permuted = {t.param for t in terms}
    if any(p in permuted for p in _unindexed_params(f)):
        return None
    if any(param not in shapes for param, _ in pairs):
        return None
    m = f.basis.shape[0]
    per_item: list[list[Tensor]] = [[] for _ in range(n)]
    fixed: list[Tensor] = []
    for param, index in pairs:
        idx = index.expand(shapes[param])
        ts = [t for (p, _), t in moved.items() if p == param]
        if not ts:
            fixed.append(idx.reshape(-1))
            continue
        if len(ts) > 1:  # one parameter permuted along two axes: not followed here
            return None
        t = ts[0]
        along = idx.movedim(t.axis, 0)
        inside = torch.zeros(along.shape[0], dtype=torch.bool)
        inside[t.entries.reshape(-1)] = True
        fixed.append(along[~inside].reshape(-1))
        for c in range(n):
            per_item[c].append(along[t.entries[c]].reshape(-1))
    if not per_item[0]:
        return []
    lists = [torch.cat(x) for x in per_item]
    fixed_rows = torch.cat(fixed) if fixed else torch.zeros(0, dtype=torch.long)
    return _conjugates(f, lists, fixed_rows, m)


def _conjugates(
    f: MonomialScaleFactor, lists: list[Tensor], fixed_rows: Tensor, m: int
) -> list[tuple[str, Tensor]] | None:
    """The conjugates from the classes at each item's entries (`lists`, in the same order
    for every item) and at the entries no item holds (`fixed_rows`); `m`: unscaled."""
    n = len(lists)
    pattern = _first_seen(lists[0])
    if any(not torch.equal(_first_seen(x), pattern) for x in lists[1:]):
        return None
    owners: dict[int, set[int]] = {}
    for c, x in enumerate(lists):
        for r in x.tolist():
            owners.setdefault(r, set()).add(c)
    shared = {int(r) for r in fixed_rows.tolist()} | {r for r, o in owners.items() if len(o) == n}
    if any(1 < len(o) < n and r not in shared for r, o in owners.items()):
        return None
    # the kind of every position (unscaled, fixed, the item's own) is the same in each item
    kinds = [
        torch.tensor([0 if r >= m else 1 if r in shared else 2 for r in x.tolist()]) for x in lists
    ]
    if any(not torch.equal(k, kinds[0]) for k in kinds[1:]):
        return None
    own = [[r for r in dict.fromkeys(x.tolist()) if r < m and r not in shared] for x in lists]
    owner_of = {r: c for c, rows in enumerate(own) for r in rows}
    B = f.basis
    hits = _owners_hit(B, owner_of, n)
    if hits is None:
        return None
    cols: list[list[int]] = [[] for _ in range(n)]
    free_cols = []
    for j, c in enumerate(hits.tolist()):
        if c >= 0 and n > 1:
            cols[c].append(j)
        else:  # touching no item's classes, or every item's (checked alike below)
            free_cols.append(j)
    if any(len(c) != len(cols[0]) for c in cols):
        return None
    fixed = sorted(r for r in shared if r < m)
    ref_own = B[own[0]][:, cols[0]]
    ref_fixed = B[fixed][:, cols[0]]
    ref_free = B[own[0]][:, free_cols]
    for c in range(1, n):
        if not (
            torch.equal(B[own[c]][:, cols[c]], ref_own)
            and torch.equal(B[fixed][:, cols[c]], ref_fixed)
            and torch.equal(B[own[c]][:, free_cols], ref_free)
        ):
            return None
    return [(f.name, torch.tensor([cols[c][i] for c in range(n)])) for i in range(len(cols[0]))]


def _owners_hit(B: Tensor, owner_of: dict[int, int], n: int) -> Tensor | None:
    """Per column of `B` `(m, dim)`, the one item whose own classes it touches, `-1` for
    none or all `n` of them; `None` when a column touches some items but not all. A block of
    columns at a time (one `nonzero` each: `B` may have tens of thousands of columns)."""
    owner = torch.full((B.shape[0],), -1, dtype=torch.long)
    if owner_of:
        owner[torch.tensor(list(owner_of))] = torch.tensor(list(owner_of.values()))
    out = torch.full((B.shape[1],), -1, dtype=torch.long)
    step = max(1, (1 << 24) // max(B.shape[0], 1))
    for a in range(0, B.shape[1], step):
        rows, cols = B[:, a : a + step].nonzero(as_tuple=True)
        who = owner[rows]
        keep = who >= 0
        pairs = torch.unique(cols[keep] * n + who[keep])
        col, item = pairs // n, pairs % n
        count = torch.bincount(col, minlength=min(step, B.shape[1] - a))
        if bool(((count > 1) & (count < n)).any()):
            return None
        one = count[col] == 1
        out[a + col[one]] = item[one]
    return out


def _first_seen(x: Tensor) -> Tensor:
    """For each position, the first position holding the same value (the pattern of repeats)."""
    _, inv = torch.unique(x, return_inverse=True)
    first = torch.full((int(inv.max()) + 1 if inv.numel() else 0,), x.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inv, torch.arange(x.numel()), reduce="amin")
    return first[inv]


def _indexed(f: MonomialScaleFactor) -> list[tuple[str, Tensor]]:
    """`(param, class index)` of every term of `f` that scales entries by class."""
    out = []
    for t in f.terms:
        if isinstance(t, Scale):
            out.append((t.param, t.index))
        elif isinstance(t, BatchNormShift):
            out += [(t.weight, t.index), (t.bias, t.index)]
    return out


def _unindexed_params(f: MonomialScaleFactor) -> list[str]:
    """Parameters of `f`'s other terms (a tied weight's alias), which follow no class."""
    out = []
    for t in f.terms:
        if not isinstance(t, (Scale, BatchNormShift)):
            out += [getattr(t, a) for a in ("source", "alias", "weight", "bias") if hasattr(t, a)]
    return out
