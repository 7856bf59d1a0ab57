"""Label bookkeeping for symmetry discovery.

Every floating tensor in the traced graph carries two integer label maps of its own shape:

- a *scale* label: the id of the positive scale variable that entry is multiplied by under
  a rescaling (0: never scaled, -1: the entry is zero, any scale fits);
- a *perm* label: the id of the channel the entry belongs to under permutations
  (0: not permutable, -1: zero entry).

Sources (linear, conv, normalization layers) create blocks of fresh ids, one per output
channel. Scale ids are merged by union-find when an operation needs two scales to agree;
perm ids live in blocks ("channel spaces") that are merged only channel-for-channel.

A scale id stands for a log-scale variable `u_id`; union-find is Gaussian elimination of the
two-term equations `u_a = u_b` (and `u_a = 0` for `FIXED`). Products and powers add a
*monomial* id: `u_m = Σ e_v u_v` over other ids, with rational `e_v` (`a * b`: `u_a + u_b`;
`a / b`: `u_a − u_b`; `x ** k`: `k u_x`; `rsqrt(x)`: `−u_x / 2`). Its defining equation is
kept in `mono` and solved with the others once propagation ends (`_monomials.py`: one exact
null-space solve per connected component).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

from ..groups import BatchNormShift, Breaker, OffsetScale, Scale

__all__ = ["FIXED", "ZERO", "Labels", "terms_by_factor", "terms_of", "unique_pairs"]

FIXED = 0
ZERO = -1


@dataclass
class Labels:
    """Union-find over scale ids, blocks of perm ids, recorded terms and breakers."""

    parent: list[int] = field(default_factory=lambda: [0])
    block_of: list[int] = field(default_factory=lambda: [-1])  # id -> block index
    blocks: list[tuple[int, int, str]] = field(default_factory=list)  # (base, size, node)
    block_parent: list[int] = field(default_factory=list)
    block_fixed: list[bool] = field(default_factory=list)
    breakers: list[Breaker] = field(default_factory=list)
    scale_terms: list[tuple] = field(default_factory=list)
    perm_terms: list[tuple] = field(default_factory=list)
    links: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (scale ids, perm ids)
    param_users: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    #: index in `scale_terms` -> the graph node whose rule recorded it (one parameter used
    #: by several nodes, e.g. a module called twice, has one set of records per node)
    term_node: dict[int, str] = field(default_factory=dict)
    #: factors found directly from the graph (GL between linears, absorbed bias shifts)
    extra: list = field(default_factory=list)
    #: monomial ids: `u_m = Σ e u_v`, as `m -> {v: e}` (see the module doc)
    mono: dict[int, dict[int, Fraction]] = field(default_factory=dict)
    #: the monomial ids of one variable (powers, `u_m = k u_v`)
    powers: list[int] = field(default_factory=list)
    #: ids whose classes a `MonomialScaleFactor` took over (then fixed, see `_monomials.py`)
    claimed: set[int] = field(default_factory=set)
    #: claimed ids of a `MonomialScaleFactor`'s class -> the factor's name (permutations
    #: conjugate it by its basis, see `_perm_monomial.py`; other claimed ids are ties')
    mono_of: dict[int, str] = field(default_factory=dict)

    # -- ids ----------------------------------------------------------------------------
    def fresh(self, n: int, node: str) -> Tensor:
        base = len(self.parent)
        self.parent.extend(range(base, base + n))
        b = len(self.blocks)
        self.blocks.append((base, n, node))
        self.block_parent.append(b)
        self.block_fixed.append(False)
        self.block_of.extend([b] * n)
        return torch.arange(base, base + n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def roots(self) -> Tensor:
        """`(ids + 1,)`: the union-find root of every scale id (what `find` returns), and
        `FIXED` last, the entry the `ZERO` label (-1) indexes. Pointer jumping over all ids
        at once: a `find` per id costs seconds and a list of millions of ints for a
        7B-shaped model."""
        p = torch.tensor(self.parent)
        while True:
            q = p[p]
            if torch.equal(q, p):
                break
            p = q
        return torch.cat([p, p.new_tensor([FIXED])])

    def union(self, a: int, b: int) -> None:
        if a == ZERO or b == ZERO:
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb == FIXED:
            ra, rb = rb, ra
        self.parent[rb] = ra  # FIXED stays a root

    def union_all(self, ids: Tensor | Sequence[int]) -> int:
        """Merge all scale ids in `ids` (ignoring ZERO); return one representative or ZERO."""
        # a list, not `torch.unique`: called once per channel, small tensors dominate the time
        flat = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else ids
        vals = [v for v in sorted(set(flat)) if v != ZERO]
        for v in vals[1:]:
            self.union(vals[0], v)
        return vals[0] if vals else ZERO

    def fix_scales(self, ids: Tensor, node: str, reason: str, *, quiet: bool = False) -> None:
        vals = [v for v in torch.unique(ids).tolist() if v > 0]
        free = [v for v in vals if self.find(v) != FIXED]
        for v in vals:
            self.union(FIXED, v)
        if free and self.powers:
            self.settle()
        if free and not quiet:
            self.breakers.append(Breaker(node, reason))

    # -- monomials ----------------------------------------------------------------------
    def monomials(self, terms: list[dict[int, Fraction]], node: str) -> list[int]:
        """One id per exponent vector `{id: e}` (`u = Σ e u_id`): `FIXED` for an empty one
        (after dropping fixed ids and zero exponents), the id itself for `{id: 1}` (no
        equation), else a new monomial id whose defining equation is recorded."""
        vecs = [self.reduced(t) for t in terms]
        new = [k for k, vec in enumerate(vecs) if len(vec) > 1 or set(vec.values()) - {1}]
        out = [next(iter(vec), FIXED) for vec in vecs]
        if new:
            ids = self.fresh(len(new), node).tolist()
            self.block_fixed[-1] = True  # ids of values, not channels: never permuted
            for k, m in zip(new, ids):
                self.mono[m] = vecs[k]
                out[k] = m
                if len(vecs[k]) == 1:
                    self.powers.append(m)
        return out

    def reduced(self, vec: dict[int, Fraction]) -> dict[int, Fraction]:
        """`vec` over union-find roots: exponents of one root summed, fixed ids and zero
        exponents dropped."""
        out: dict[int, Fraction] = {}
        for v, e in vec.items():
            r = self.find(v)
            if r != FIXED:
                out[r] = out.get(r, Fraction(0)) + Fraction(e)
        return {r: e for r, e in out.items() if e != 0}

    def settle(self) -> None:
        """Fix what a power's equation forces on its own: a fixed `u_m = k u_v` (`k ≠ 0`)
        fixes `u_v` (RMSNorm's `mean(x²) + ε` fixes `x`, as union-find did before), and a
        power of a fixed id is fixed. Only powers are followed (products are left to the
        solve): few, so that this stays cheap when called at every `fix_scales`."""
        changed = True
        while changed:
            changed = False
            for m in self.powers:
                free = self.reduced(self.mono[m])
                if self.find(m) == FIXED and len(free) == 1:
                    self.union(FIXED, next(iter(free)))
                    changed = True
                elif not free and self.find(m) != FIXED:
                    self.union(FIXED, m)
                    changed = True

    def drop_outputs_of(self, nodes: set[str]) -> None:
        """Fix the scale and perm labels of every block created by one of `nodes` (a larger
        factor found elsewhere contains their rescalings and permutations)."""
        t = self.ids_made_by(nodes)
        if len(t):
            self.fix_scales(t, "", "", quiet=True)
            self.fix_perms(t, "", "", quiet=True)

    def ids_made_by(self, nodes: set[str] | frozenset[str]) -> Tensor:
        """`(k,)`, ascending: the ids of every block created by one of `nodes` (block by
        block, not id by id: a large model has millions of ids and a few hundred blocks)."""
        ranges = [torch.arange(base, base + n) for base, n, node in self.blocks if node in nodes]
        return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long)

    # -- perm blocks --------------------------------------------------------------------
    def bfind(self, b: int) -> int:
        while self.block_parent[b] != b:
            self.block_parent[b] = self.block_parent[self.block_parent[b]]
            b = self.block_parent[b]
        return b

    def space(self, pid: int) -> tuple[int, int]:
        """`(root block, channel index)` of a perm id > 0."""
        b = self.block_of[pid]
        return self.bfind(b), pid - self.blocks[b][0]

    def fix_perms(self, ids: Tensor, node: str, reason: str, *, quiet: bool = False) -> None:
        roots = {self.bfind(self.block_of[v]) for v in torch.unique(ids).tolist() if v > 0}
        newly = [r for r in roots if not self.block_fixed[r]]
        for r in roots:
            self.block_fixed[r] = True
        if newly and not quiet:
            self.breakers.append(Breaker(node, f"permutations: {reason}"))

    def align(self, a: Tensor, b: Tensor, node: str) -> None:
        """Two perm label maps meet elementwise (an addition): their channel spaces must agree
        channel for channel, else both lose their permutation symmetry."""
        mask = (a > 0) & (b > 0)
        pairs = unique_pairs(a[mask], b[mask]).tolist() if mask.any() else []
        ok, merges = True, set()
        for pa, pb in pairs:
            (ra, ia), (rb, ib) = self.space(pa), self.space(pb)
            if ia != ib or self.blocks[ra][1] != self.blocks[rb][1]:
                ok = False
                break
            merges.add((ra, rb))
        mixed = ((a > 0) & (b == FIXED)) | ((a == FIXED) & (b > 0))
        if not ok or mixed.any():
            self.fix_perms(
                torch.cat([a.reshape(-1), b.reshape(-1)]),
                node,
                "channels of the two operands do not correspond",
            )
            return
        for ra, rb in merges:
            ra, rb = self.bfind(ra), self.bfind(rb)
            if ra != rb:
                self.block_parent[rb] = ra
                self.block_fixed[ra] = self.block_fixed[ra] or self.block_fixed[rb]

    def per_channel(self, ids: Tensor, axis: int) -> list[tuple[int, ...]]:
        """Distinct non-ZERO ids for each index along `axis` (sorted)."""
        moved = ids.movedim(axis, 0).reshape(ids.shape[axis], -1)
        # vectorized (one `unique` per channel costs minutes for a 7B model's 10⁶ channels);
        # the common case, one id per channel, is one tensor split into rows
        srt = moved.sort(dim=1).values
        new = torch.ones_like(srt, dtype=torch.bool)
        new[:, 1:] = srt[:, 1:] != srt[:, :-1]
        new &= srt != ZERO
        # as lists of ints: creating 10⁴ small tensors per layer costs more than the sort
        vals, counts = srt[new].tolist(), new.sum(1).tolist()
        if min(counts, default=1) == 1 == max(counts, default=1):  # one id per channel
            return list(zip(vals))  # 1-tuples, built in C (10⁶ lists cost seconds)
        out, k = [], 0
        for c in counts:
            out.append(tuple(vals[k : k + c]))
            k += c
        return out


def unique_pairs(a: Tensor, b: Tensor) -> Tensor:
    """The distinct pairs `(a_i, b_i)`, `(k, 2)` sorted: one key per pair (ids are far
    below 2³¹) and a 1-D `unique`, much faster than `unique(dim=0)`."""
    keys = torch.unique(a.reshape(-1) * (1 << 31) + b.reshape(-1))
    return torch.stack([keys >> 31, keys & ((1 << 31) - 1)], -1)


def terms_of(records: list[tuple], lut: Tensor, n: int, skip: set[str] = frozenset()) -> list:
    """The `Scale` / `OffsetScale` / `BatchNormShift` terms of a factor with `n` scales,
    from the recorded scale terms (`(param, ids, power)`, with the offset fourth for a gain
    read as `param + offset`): `lut` maps a label id to the factor's scale index (`n`: not
    in it; index `-1`, the `ZERO` label, maps to the last entry). Records of parameters in
    `skip` are left out (a tied weight written through another name)."""
    terms: list = []
    for rec in records:
        if rec[0] != "bnshift" and rec[0] in skip:
            continue
        idx = lut[_record_ids(rec)]
        if (idx < n).any():
            terms.append(_term(rec, idx))
    return terms


def terms_by_factor(records: list[tuple], fac: Tensor, pos: Tensor, sizes: list[int]) -> list:
    """The terms of several factors at once, per factor in the order of `records` (as
    `terms_of` gives them for each factor): `fac` and `pos`, `(ids + 1,)`, map a label id
    to its factor (`-1`: none; the last entry is the `ZERO` label's) and its scale index
    there; factor `k` has `sizes[k]` scales. One pass over the records, with no look-up
    table per factor (a table of every id per factor costs classes × ids)."""
    out: list[list] = [[] for _ in sizes]
    for rec in records:
        ids = _record_ids(rec)
        f = fac[ids]
        for k in torch.unique(f).tolist():
            if k >= 0:
                out[k].append(_term(rec, torch.where(f == k, pos[ids], sizes[k])))
    return out


def _record_ids(rec: tuple) -> Tensor:
    """The label ids of a recorded scale term (`("bnshift", bn, eps, ids)` or
    `(param, ids, power, [offset])`)."""
    return rec[3] if rec[0] == "bnshift" else rec[1]


def _term(rec: tuple, idx: Tensor) -> Scale | OffsetScale | BatchNormShift:
    """The term a recorded scale term gives, its ids mapped to the factor's indices `idx`."""
    if rec[0] == "bnshift":
        _, bn, eps, _ = rec
        names = (f"{bn}.{x}" for x in ("weight", "bias", "running_mean", "running_var"))
        return BatchNormShift(*names, eps, idx)
    param, _, power, *offset = rec  # a fourth entry: the gain's offset (`OffsetScale`)
    return OffsetScale(param, idx, power, offset[0]) if offset else Scale(param, idx, power)
