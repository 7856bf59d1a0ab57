"""Re-linking factors whose action depends on others in the group.

Some factors (LayerNorm kernels, centered outputs) act on weights that other factors also
transform. Once the whole list is known, each is linked (`link_one` declares how the others
move it, or returns `None` to drop it), the permutations that reorder its weights learn to
conjugate it, and every other factor may be adjusted to the linked ones.
"""

from __future__ import annotations

from collections.abc import Callable

from ..groups import PermutationFactor

__all__ = ["relink"]


def relink(
    factors: list,
    kind: type,
    link_one: Callable[[object, list], object | None],
    conjugate: Callable[[PermutationFactor, list], PermutationFactor],
    adjust: Callable[[object, list], object] | None = None,
) -> list:
    """`factors` with every factor of type `kind` replaced by `link_one(f, factors)` (left
    out where that is `None`), every permutation by `conjugate(p, linked)`, and every other
    factor by `adjust(g, linked)` (unchanged without `adjust`). The order is kept."""
    found = [f for f in factors if isinstance(f, kind)]
    if not found:
        return factors
    linked = {f.name: link_one(f, factors) for f in found}
    kept = [f for f in linked.values() if f is not None]
    out = []
    for g in factors:
        if isinstance(g, kind):
            if linked[g.name] is not None:
                out.append(linked[g.name])
        elif isinstance(g, PermutationFactor):
            out.append(conjugate(g, kept))
        else:
            out.append(adjust(g, kept) if adjust is not None else g)
    return out
