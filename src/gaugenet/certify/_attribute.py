"""Attributing the missing directions of `ker J` to measured causes, by projection.

A cause is a set of parameter directions that were each *checked* to lie in `ker J` (to the
rank tolerance) for a stated reason: entries never read, entries read only together, layers
fed by a table, LayerNorms whose `eps` is too small to see. A missing direction counts as
explained when it lies in the span of the causes' directions plus the orbit: its distance
from that span (after projecting off the orbit) is at most `ANGLE_TOL`. The causes are taken
in order and each is credited with the dimension it adds, so the counts add up, with the
unexplained remainder, to the missing dimension; nothing is ever subtracted from a count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._orbit import Orbit
from ._svd import svd

__all__ = ["ANGLE_TOL", "Attribution", "CauseSpace", "attribute", "span"]

#: a missing unit direction is explained when its distance from the causes' span is at most this
ANGLE_TOL = 1e-6


@dataclass(frozen=True)
class CauseSpace:
    """Directions of `ker J` with a reason.

    - `reason`: what they are, in words, after "k directions" (`"of entries read only in a
      fixed sum or difference"`).
    - `where`: the parameter tensors they touch.
    - `directions`: `(n_params, k)`, each checked to lie in `ker J` to the rank tolerance.
    """

    reason: str
    where: tuple[str, ...]
    directions: Tensor


@dataclass(frozen=True)
class Attribution:
    """- `dims`: per cause, the dimension of the missing subspace it explains beyond the
      causes before it (`0` when its directions add nothing off the orbit).
    - `rest`: `(n_params, k)` an orthonormal basis of the missing directions no cause explains."""

    dims: tuple[int, ...]
    rest: Tensor


def span(m: Tensor, floor: float) -> Tensor:
    """An orthonormal basis `(n, k)` of the range of `m` `(n, j)` (singular values above
    `floor`)."""
    if m.shape[1] == 0:
        return m
    u, s, _ = svd(m, full_matrices=False)
    return u[:, : int((s > floor).sum())]


def _explained(missing: Tensor, basis: Tensor, tol: float) -> tuple[int, Tensor]:
    """How many orthonormal directions of `missing` `(n, m)` lie within `tol` of the span of
    the orthonormal `basis` `(n, j)`, and an orthonormal basis of the others."""
    if basis.shape[1] == 0 or missing.shape[1] == 0:
        return 0, missing
    off = missing - basis @ (basis.T @ missing)
    _, s, vh = svd(off, full_matrices=False)  # s: sines of principal angles
    k = int((s <= tol).sum())
    return k, missing @ vh[: len(s) - k].T


def attribute(
    missing: Tensor, orbit: Orbit, causes: Sequence[CauseSpace], tol: float = ANGLE_TOL
) -> Attribution:
    """Attribute the orthonormal missing directions `missing` `(n_params, m)` (`ker J` off
    the orbit) to `causes`, in order.

    Each cause's directions are projected off the orbit and joined to those before; the
    count of missing directions within `tol` of the joined span, less the count before, is
    that cause's dimension."""
    dims, before, joined = [], 0, []
    rest = missing
    for cause in causes:
        d = cause.directions
        if d.shape[1]:
            joined.append(orbit(d / d.norm(dim=0).clamp_min(1e-300)))
        basis = span(torch.cat(joined, 1), 1e-8) if joined else missing[:, :0]
        k, rest = _explained(missing, basis, tol)
        dims.append(k - before)
        before = k
    return Attribution(tuple(dims), rest)
