"""Where a group falls short: the directions of `ker J` that are no orbit tangent, located in
the parameters.

Two kinds are told apart. Parameter entries whose Jacobian column is exactly zero are never
read on these inputs (embedding rows no input token selects, position rows beyond the
sequence, relative-position buckets no distance falls in): they are redundant on the inputs,
not symmetries of the model, so discovery rightly leaves them out. Every other missing
direction is reported by the parameters it lives in (its squared weight per tensor, summed
over an orthonormal basis of the missing subspace, so the shares add up to its dimension).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._orbit import Orbit

__all__ = ["GapReport", "locate_gap"]


@dataclass(frozen=True)
class GapReport:
    """- `unread`: `(parameter, entries)` with an exactly zero Jacobian column.
    - `located`: `(parameter, share)` of the other missing directions, largest first
      (shares below `0.05` left out).
    - `missing`: the dimension of `ker J` off the orbit (unread entries included)."""

    unread: tuple[tuple[str, int], ...]
    located: tuple[tuple[str, float], ...]
    missing: int

    def lines(self, top: int = 4) -> list[str]:
        """Human-readable causes, one line per kind."""
        out = []
        if self.unread:
            n = sum(k for _, k in self.unread)
            parts = ", ".join(f"{p} ({k})" for p, k in self.unread[:top])
            more = f" and {len(self.unread) - top} more" if len(self.unread) > top else ""
            out.append(f"{n} parameter entries never read on these inputs: {parts}{more}")
        if self.located:
            rest = self.missing - sum(k for _, k in self.unread)
            parts = ", ".join(f"{p} ({s:.1f})" for p, s in self.located[:top])
            more = f" and {len(self.located) - top} more" if len(self.located) > top else ""
            out.append(f"{rest} unexplained directions, in {parts}{more}")
        return out


def locate_gap(
    jac: Tensor,
    orbit: Orbit,
    rank: int,
    names: Sequence[str],
    sizes: Sequence[int],
) -> GapReport:
    """The `GapReport` of the Jacobian `jac` `(n_outputs, n_params)` of numerical rank
    `rank` against the orbit tangents `orbit` (an `Orbit` on the same flat parameters,
    ordered as `names` with `sizes` entries each). Costs one full SVD of `jac`."""
    n = jac.shape[1]
    _, _, vh = torch.linalg.svd(jac, full_matrices=True)
    kernel = vh[rank:].T  # (n, n - rank)
    off = orbit(kernel)
    u, s, _ = torch.linalg.svd(off, full_matrices=False)
    missing = int((s > 0.5).sum())
    basis = u[:, :missing]
    zero = jac.abs().amax(0) == 0  # (n,)
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    unread = []
    for name, a, b in zip(names, starts, starts[1:]):
        k = int(zero[a:b].sum())
        if k:
            unread.append((name, k))
    rest = basis.clone()
    rest[zero] = 0
    k_rest = missing - int(zero.sum())
    located: list[tuple[str, float]] = []
    if k_rest > 0 and n:
        u2, _, _ = torch.linalg.svd(rest, full_matrices=False)
        w = (u2[:, :k_rest] ** 2).sum(1)
        for name, a, b in zip(names, starts, starts[1:]):
            share = float(w[a:b].sum())
            if share >= 0.05:
                located.append((name, share))
        located.sort(key=lambda t: -t[1])
    return GapReport(tuple(unread), tuple(located), missing)
