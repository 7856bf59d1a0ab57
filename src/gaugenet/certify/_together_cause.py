"""Parameter entries read only together: nonzero Jacobian columns that are equal or opposite.

When two entries only ever enter the outputs through their sum (a word-embedding row and a
position row when that token occurs at that one position only, say) or their difference,
their columns of `J` agree up to sign, and moving one up and the other down (or both up)
changes nothing on these inputs. Found from `J` alone: the columns are sorted by a random
projection, and neighbours whose difference (or sum) is under the rank tolerance are joined;
a group of `k` entries gives `k − 1` directions. Whole tensors paired entry by entry (two
biases added into one stream) are a symmetry on any input, not a cause: they are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._attribute import CauseSpace

__all__ = ["together_cause"]


def _groups(jac: Tensor, floor: float) -> list[list[tuple[int, float]]]:
    """Groups of `(column, sign)` with `‖J[:, i] − sign · J[:, j]‖ ≤ floor` (joined
    transitively), over the columns of norm above `floor`."""
    norms = jac.norm(dim=0)
    cols = (norms > floor).nonzero().flatten()
    if len(cols) < 2:
        return []
    r = torch.randn(jac.shape[0], generator=torch.Generator().manual_seed(0), dtype=jac.dtype)
    proj = r @ jac[:, cols]
    sign = torch.where(proj < 0, -1.0, 1.0).to(jac.dtype)
    key, order = (proj * sign).sort()
    bound = floor * float(r.norm())  # |r·(a − b)| ≤ ‖r‖ ‖a − b‖
    parent = list(range(len(cols)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(len(order)):
        i = int(order[a])
        ci = jac[:, cols[i]] * sign[i]
        for b in range(a + 1, len(order)):
            if float(key[b] - key[a]) > bound:
                break
            j = int(order[b])
            if float((ci - jac[:, cols[j]] * sign[j]).norm()) <= floor:
                parent[find(j)] = find(i)
    members: dict[int, list[tuple[int, float]]] = {}
    for i in range(len(cols)):
        members.setdefault(find(i), []).append((int(cols[i]), float(sign[i])))
    return [g for g in members.values() if len(g) > 1]


def _whole(
    groups: list[list[tuple[int, float]]], owners: Tensor, sizes: Sequence[int]
) -> list[bool]:
    """Per group, whether it pairs whole tensors: every entry of each tensor it touches lies
    in a group over that same set of tensors (two biases added, say)."""
    sets = [frozenset(int(owners[i]) for i, _ in g) for g in groups]
    entries: dict[frozenset[int], int] = {}
    for g, t in zip(groups, sets):
        entries[t] = entries.get(t, 0) + len(g)
    return [entries[t] == sum(sizes[k] for k in t) for t in sets]


def together_cause(
    jac: Tensor, floor: float, names: Sequence[str], sizes: Sequence[int]
) -> CauseSpace:
    """The `CauseSpace` of entries read only together: for each group of nonzero columns of
    `jac` `(n_outputs, n_params)` equal up to sign within `floor` (the rank tolerance
    `rtol · σ_max`), the differences `s_0 e_0 − s_i e_i`; each is in `ker J` to `floor`.

    Groups that pair whole tensors entry by entry are left out: those tensors are only ever
    read in their sum, on any input, which is a symmetry of the model (one discovery does
    not offer), not a property of these inputs; they stay unexplained."""
    owners = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))
    groups = _groups(jac, floor)
    groups = [g for g, whole in zip(groups, _whole(groups, owners, sizes)) if not whole]
    dirs = torch.zeros(jac.shape[1], sum(len(g) - 1 for g in groups), dtype=jac.dtype)
    k = 0
    where: set[str] = set()
    for g in groups:
        (i0, s0), *others = g
        for i, s in others:
            dirs[i0, k], dirs[i, k] = s0, -s
            where |= {names[int(owners[i0])], names[int(owners[i])]}
            k += 1
    reason = "of entries read only in a fixed sum or difference on these inputs"
    return CauseSpace(reason, tuple(sorted(where)), dirs)
