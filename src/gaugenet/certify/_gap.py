"""Where a group falls short: the directions of `ker J` that are no orbit tangent, located in
the parameters.

Two kinds are told apart. Parameter entries whose Jacobian column is exactly zero are never
read on these inputs (embedding rows no input token selects, position rows beyond the
sequence, relative-position buckets no distance falls in) or are an embedding's padding row,
whose gradient torch masks by definition: they are redundant on the inputs (or to autograd),
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
    - `unread_dim`: the dimension those entries add off the orbit (some of their changes
      may be orbit tangents already, e.g. a row moved along `1`).
    - `located`: `(parameter, share)` of the other missing directions, largest first
      (shares below `0.05` left out).
    - `missing`: the dimension of `ker J` off the orbit (`unread_dim` included)."""

    unread: tuple[tuple[str, int], ...]
    unread_dim: int
    located: tuple[tuple[str, float], ...]
    missing: int

    def lines(self, top: int = 4) -> list[str]:
        """Human-readable causes, one line per kind."""
        out = []
        if self.unread_dim:
            parts = ", ".join(f"{p} ({k})" for p, k in self.unread[:top])
            more = f" and {len(self.unread) - top} more" if len(self.unread) > top else ""
            out.append(
                f"{self.unread_dim} directions of entries with no effect on these inputs "
                f"(never read, or a padding row): {parts}{more}"
            )
        if self.located:
            rest = self.missing - self.unread_dim
            parts = ", ".join(f"{p} ({s:.1f})" for p, s in self.located[:top])
            more = f" and {len(self.located) - top} more" if len(self.located) > top else ""
            out.append(f"{rest} unexplained directions, in {parts}{more}")
        return out


def _span(m: Tensor, floor: float) -> Tensor:
    """An orthonormal basis `(n, k)` of the range of `m` (singular values above `floor`)."""
    if m.shape[1] == 0:
        return m
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, : int((s > floor).sum())]


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
    _, _, vh = torch.linalg.svd(jac, full_matrices=True)
    missing_basis = _span(orbit(vh[rank:].T), 0.5)  # ker J off the orbit
    missing = missing_basis.shape[1]
    zero = (jac.abs().amax(0) == 0).nonzero().flatten()
    eye = torch.zeros(jac.shape[1], len(zero), dtype=jac.dtype)
    eye[zero, torch.arange(len(zero))] = 1
    unread_basis = _span(orbit(eye), 1e-6)  # what the unread entries add off the orbit
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    is_zero = torch.zeros(jac.shape[1], dtype=torch.bool)
    is_zero[zero] = True
    unread = []
    for name, a, b in zip(names, starts, starts[1:]):
        k = int(is_zero[a:b].sum())
        if k:
            unread.append((name, k))
    rest = missing_basis - unread_basis @ (unread_basis.T @ missing_basis)
    k_rest = missing - unread_basis.shape[1]
    located: list[tuple[str, float]] = []
    if k_rest > 0:
        w = (_span(rest, 0.5)[:, :k_rest] ** 2).sum(1)
        for name, a, b in zip(names, starts, starts[1:]):
            share = float(w[a:b].sum())
            if share >= 0.05:
                located.append((name, share))
        located.sort(key=lambda t: -t[1])
    return GapReport(tuple(unread), unread_basis.shape[1], tuple(located), missing)
