"""Where a group falls short: the directions of `ker J` that are no orbit tangent, attributed
to measured causes and located in the parameters.

Parameter entries whose Jacobian column is exactly zero are never read on these inputs
(embedding rows no input token selects, position rows beyond the sequence, relative-position
buckets no distance falls in) or are an embedding's padding row, whose gradient torch masks
by definition: they are redundant on the inputs (or to autograd), not symmetries of the
model, so discovery rightly leaves them out. Given the model, further causes are measured
(`_together_cause`, `_table_cause`, `_eps_cause`): each builds directions checked to lie in
`ker J`, and the missing directions are attributed to them by projection (`_attribute`).
Every missing direction no cause explains is reported by the parameters it lives in (its
squared weight per tensor, summed over an orthonormal basis of the unexplained subspace, so
the shares add up to its dimension).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._attribute import ANGLE_TOL, CauseSpace, attribute, span
from ._eps_cause import eps_cause
from ._jacobian import FlatModel
from ._orbit import Orbit
from ._svd import svd
from ._table_cause import table_cause
from ._together_cause import together_cause

__all__ = ["GapReport", "locate_gap"]


@dataclass(frozen=True)
class GapReport:
    """- `unread`: `(parameter, entries)` with an exactly zero Jacobian column.
    - `unread_dim`: the dimension those entries add off the orbit (some of their changes
      may be orbit tangents already, e.g. a row moved along `1`).
    - `explained`: `(reason, dimension, where)` per measured cause (beyond the unread
      entries and the causes before it), in the order they were attributed; `where` names
      the parameters or modules involved.
    - `unexplained`: the missing dimension no cause explains; `unread_dim`, the
      `explained` dimensions and `unexplained` add up to `missing`.
    - `located`: `(parameter, share)` of the unexplained directions, largest first
      (shares below `0.05` left out).
    - `missing`: the dimension of `ker J` off the orbit (`unread_dim` included).
    - `tol`: the distance from the causes' span (per unit direction) under which a missing
      direction counts as explained."""

    unread: tuple[tuple[str, int], ...]
    unread_dim: int
    located: tuple[tuple[str, float], ...]
    missing: int
    explained: tuple[tuple[str, int, tuple[str, ...]], ...] = ()
    unexplained: int = 0
    tol: float = ANGLE_TOL

    def lines(self, top: int = 4) -> list[str]:
        """Human-readable causes, one line per kind."""

        def listed(items: Sequence[str]) -> str:
            more = f" and {len(items) - top} more" if len(items) > top else ""
            return ", ".join(items[:top]) + more

        out = []
        if self.unread_dim:
            out.append(
                f"{self.unread_dim} directions of entries with no effect on these inputs "
                f"(never read, or a padding row): {listed([f'{p} ({k})' for p, k in self.unread])}"
            )
        for reason, dim, where in self.explained:
            if dim:
                out.append(f"{dim} directions {reason}: {listed(where)}")
        if self.unexplained:
            parts = listed([f"{p} ({s:.1f})" for p, s in self.located])
            out.append(f"{self.unexplained} unexplained directions, in {parts}")
        return out


def _unread(jac: Tensor, names: Sequence[str], starts: list[int]) -> tuple[Tensor, list]:
    """The unit directions `(n_params, z)` of the exactly zero columns of `jac`, and
    `(parameter, count)` of them."""
    zero = (jac.abs().amax(0) == 0).nonzero().flatten()
    eye = torch.zeros(jac.shape[1], len(zero), dtype=jac.dtype)
    eye[zero, torch.arange(len(zero))] = 1
    is_zero = torch.zeros(jac.shape[1], dtype=torch.bool)
    is_zero[zero] = True
    counts = [(n, int(is_zero[a:b].sum())) for n, a, b in zip(names, starts, starts[1:])]
    return eye, [(n, k) for n, k in counts if k]


def _renamer(own: Sequence[str], names: Sequence[str]) -> Callable[[str], str]:
    """Parameter and module names of the model as the caller names its parameters: `names`
    may drop a prefix that every name of the model carries (a wrapper's)."""
    prefix = own[0][: len(own[0]) - len(names[0])] if own and own[0].endswith(names[0]) else ""
    return lambda w: w.removeprefix(prefix)


def locate_gap(
    jac: Tensor,
    orbit: Orbit,
    rank: int,
    names: Sequence[str],
    sizes: Sequence[int],
    *,
    flat: FlatModel | None = None,
    rtol: float = 1e-9,
) -> GapReport:
    """The `GapReport` of the Jacobian `jac` `(n_outputs, n_params)` of numerical rank
    `rank` (singular values above `rtol σ_max`) against the orbit tangents `orbit` (an
    `Orbit` on the same flat parameters, ordered as `names` with `sizes` entries each).
    Costs one full SVD of `jac`; given `flat` (the `FlatModel` `jac` was taken of), the
    measured causes too (a few more Jacobians)."""
    # a tall Jacobian: the same singular values and right vectors from R of its QR, cheaper
    tall = jac.shape[0] > jac.shape[1]
    _, s, vh = svd(torch.linalg.qr(jac, mode="r").R if tall else jac)
    kernel = vh[rank:].T
    missing_basis = span(orbit(kernel), 0.5)  # ker J off the orbit
    missing = missing_basis.shape[1]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    eye, unread = _unread(jac, names, starts)
    causes = [CauseSpace("never read", (), eye)]
    att = attribute(missing_basis, orbit, causes)
    if flat is not None and att.rest.shape[1]:  # more to explain: measure the causes
        floor = float(s[0]) * rtol if s.numel() else 0.0
        causes += _measured(flat, jac, kernel, missing_basis, orbit, floor, rtol)
        att = attribute(missing_basis, orbit, causes)
    rename = _renamer(flat.names if flat is not None else names, names)
    explained = tuple(
        (c.reason, d, tuple(rename(w) for w in c.where)) for c, d in zip(causes[1:], att.dims[1:])
    )
    located: list[tuple[str, float]] = []
    if att.rest.shape[1]:
        w = (att.rest**2).sum(1)
        for name, a, b in zip(names, starts, starts[1:]):
            share = float(w[a:b].sum())
            if share >= 0.05:
                located.append((name, share))
        located.sort(key=lambda t: -t[1])
    return GapReport(
        tuple(unread), att.dims[0], tuple(located), missing, explained, att.rest.shape[1]
    )


def _measured(
    fm: FlatModel,
    jac: Tensor,
    kernel: Tensor,
    missing: Tensor,
    orbit: Orbit,
    floor: float,
    rtol: float,
) -> list[CauseSpace]:
    """The measured causes, in the order they are credited: entries read together, layers
    fed by a table, LayerNorm `eps`. A cause that cannot be measured on this model (hooks
    a scripted module refuses, an operation without derivative) explains nothing: its
    directions stay unexplained rather than be guessed."""
    builders: list[Callable[[], CauseSpace]] = [
        lambda: together_cause(jac, floor, fm.names, fm.sizes),
        lambda: table_cause(fm, missing, orbit.basis(), floor),
        lambda: eps_cause(fm, jac, kernel, floor),
    ]
    out = []
    for build in builders:
        try:
            out.append(build())
        except Exception as err:  # any failure means "not measured"
            none = torch.zeros(jac.shape[1], 0, dtype=jac.dtype)
            out.append(CauseSpace(f"not measured ({type(err).__name__})", (), none))
    return out
