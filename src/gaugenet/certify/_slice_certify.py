"""`certify(..., params=...)`: the certificate of a slice of the parameters.

Measured: `|S| − rank J_S`, the dimension of `ker J ∩ ℝ^S` (exact, `_slice`). Discovered:
`dim(span T ∩ ℝ^S)`, the orbit tangents that move only entries of `S` (`_slice_orbit`,
exact or bounded). Every orbit tangent lies in `ker J`, so the discovered count is at most
the measured one; equal, the group explains every redundancy on the slice's entries (a
necessary condition for `complete` on the whole model); a difference is redundancy the
group misses (a lower bound on what it misses on the whole model), attributed like a
whole-model gap where the slice allows: entries with no effect on the inputs and entries
read only in a fixed sum; the rest located by parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ..groups import GaugeGroup
from ._attribute import ANGLE_TOL, CauseSpace, attribute, span
from ._causes import relu_causes
from ._checks import FactorChecks, check_act, check_tangents, sparse_jvp
from ._davidson import power_max
from ._functional_dimension import rank_of
from ._gap import _unread
from ._jacobian import FlatModel, first_samples, flat_model
from ._matrix_free import gauss_newton, linear_jvp
from ._orbit import Orbit
from ._result import CertifyReport, Verdict
from ._slice import slice_entries, slice_jacobian
from ._slice_orbit import SliceOrbit, slice_orbit
from ._svd import svd
from ._together_cause import together_cause

__all__ = ["SliceSummary", "certify_slice"]

#: samples `‖J‖₂` is estimated on
_NORM_SAMPLES = 16


@dataclass(frozen=True)
class SliceSummary:
    """What a slice certificate measured (`CertifyReport.slice`).

    - `size`: `|S|`; `entries`: `(parameter, count)` of its entries.
    - `measured`: `|S| − rank J_S`; `discovered`, `discovered_upper`: bounds on
      `dim(span T ∩ ℝ^S)` (equal when exact).
    - `rows`: orbit tangent rows touching the slice, of the `factors` named.
    """

    size: int
    entries: tuple[tuple[str, int], ...]
    measured: int
    discovered: int
    discovered_upper: int
    rows: int
    factors: tuple[str, ...]


def _gap_lines(
    jac: Tensor, orb: SliceOrbit, rank: int, names: list[str], sizes: list[int], floor: float
) -> list[str]:
    """The missing directions of `ker J_S` off the discovered ones, attributed to entries
    with no effect and entries read only in a fixed sum; the rest located by parameter."""
    tall = jac.shape[0] > jac.shape[1]
    _, s, vh = svd(torch.linalg.qr(jac, mode="r").R if tall else jac)
    orbit = Orbit(orb.basis.T.contiguous())
    missing = span(orbit(vh[rank:].T), 0.5)
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    eye, unread = _unread(jac, names, starts)
    causes = [CauseSpace("never read", (), eye), together_cause(jac, floor, names, sizes)]
    att = attribute(missing, orbit, causes, ANGLE_TOL)
    out = []
    if att.dims[0]:
        listed = ", ".join(f"{p} ({k})" for p, k in unread[:4])
        out.append(f"{att.dims[0]} directions of entries with no effect on these inputs: {listed}")
    if att.dims[1]:
        out.append(f"{att.dims[1]} directions {causes[1].reason}: {', '.join(causes[1].where[:4])}")
    if att.rest.shape[1]:
        w = (att.rest**2).sum(1)
        shares = [(n, float(w[a:b].sum())) for n, a, b in zip(names, starts, starts[1:])]
        shares = sorted((t for t in shares if t[1] >= 0.05), key=lambda t: -t[1])
        where = ", ".join(f"{n} ({v:.1f})" for n, v in shares[:4])
        out.append(f"{att.rest.shape[1]} unexplained directions, in {where}")
    return out


def _norm_of_j(model: nn.Module, inputs: Any, gen: torch.Generator) -> float:
    """A lower bound, close, of `‖J‖₂` of the whole model: 3 power steps on `JᵀJ` (a
    Rayleigh quotient) on the first `_NORM_SAMPLES` samples (fewer rows: a lower bound
    again). The slice's rank and residuals are relative to it, not to `‖J_S‖₂`: a slice
    whose entries are all (nearly) redundant has `J_S` at rounding level, which a
    tolerance relative to itself would count as rank."""
    head = first_samples(inputs, _NORM_SAMPLES)
    fm = flat_model(model, inputs if head is None else head)
    n = fm.theta.numel()
    none = Orbit(torch.zeros(0, n, dtype=torch.float64))
    op = gauss_newton(fm, none, linear_jvp(fm, trace=False))
    lam = power_max(op, torch.randn(n, generator=gen, dtype=torch.float64), 3)
    return math.sqrt(max(lam, 0.0))


def certify_slice(
    model: nn.Module,
    inputs: Any,
    group: GaugeGroup,
    params: Mapping[str, object],
    *,
    rtol: float,
    budget: int,
    gen: torch.Generator,
    stage: Callable[[str], AbstractContextManager[None]],
    timings: dict[str, float],
    progress: Callable[[str], None] | None,
) -> CertifyReport:
    """The `CertifyReport` of the slice `params` (see `certify`)."""
    with stage("estimating memory"):
        fm: FlatModel = flat_model(model, inputs)
        sl = slice_entries(fm, params)
        with torch.no_grad():
            n_out = fm.f(fm.theta).numel()
    if n_out <= sl.size:
        raise GaugeError(
            f"the outputs on these inputs number {n_out}, not more than the {sl.size} entries "
            "of the slice: rank J_S is capped by the outputs; pass more inputs or a smaller slice"
        )
    need = 8 * n_out * sl.size * 3
    if need > budget:
        raise GaugeError(
            f"the slice's Jacobian needs about {need / 1e9:.2f} GB, over the memory budget "
            f"{budget / 1e9:.2f} GB: raise memory_budget or pass a smaller slice"
        )
    checks = FactorChecks()
    with stage("act check"):
        check_act(model, inputs, group, checks, gen)
    with stage("slice Jacobian"):
        jac = slice_jacobian(fm, sl, n_out)
    if not bool(torch.isfinite(jac).all()):
        raise GaugeError("the slice's Jacobian is not finite on these inputs")
    with stage("norm of J"):
        norm = _norm_of_j(model, inputs, gen)
    with stage("singular values"):
        sv = rank_of(jac, rtol=rtol).singular_values
    # ‖J_S‖ ≤ ‖J‖: the larger of the two is the closer bound of ‖J‖
    smax = max(norm, float(sv[0]) if sv.numel() else 0.0)
    rank = int((sv > rtol * smax).sum()) if smax > 0 else 0
    last = float(sv[rank - 1]) if rank else 0.0
    nxt = float(sv[rank]) if rank < sv.numel() else 0.0
    fd_gap = last / nxt if nxt > 0 else math.inf
    with stage("slice orbit"):
        orb = slice_orbit(fm, group, sl)
    touching = GaugeGroup(
        tuple(f for f in group.factors if f.name in orb.factors), (), group.param_names
    )
    with stage("tangent check"):
        check_tangents(
            fm, touching, sparse_jvp(fm), smax, rtol, checks, gen, k=2, progress=progress
        )
    measured = sl.size - rank
    notes: list[str] = [
        f"slice of {sl.size} of {fm.theta.numel()} parameter entries (the others frozen): "
        f"{measured} = |S| − rank J_S against {orb.lower} orbit directions inside it",
        *checks.notes,
    ]
    if not orb.exact:
        notes.append(
            f"the orbit directions inside the slice are between {orb.lower} and {orb.upper}: "
            f"{orb.shared} entries outside it are shared with tangents that do not touch it"
        )
    wrong = dict(checks.wrong)
    if orb.lower > measured and not wrong:
        wrong["(group)"] = (
            f"{orb.lower} orbit directions inside the slice exceed |S| − rank J_S = {measured}"
        )
    if orb.lower == measured:
        unexplained: int | None = 0
    elif orb.upper < measured:
        unexplained = measured - orb.upper
    else:
        unexplained = None
        notes.append(
            "completeness on the slice not settled: the bounds on the orbit directions "
            "inside it enclose |S| − rank J_S"
        )
    if wrong:
        verdict = Verdict.WRONG
    elif unexplained is None:
        verdict = Verdict.RIGHT
    elif unexplained == 0:
        verdict = Verdict.COMPLETE
    else:
        verdict = Verdict.INCOMPLETE
    causes: list[str] = []
    if unexplained:
        with stage("looking for causes"):
            causes = _gap_lines(jac, orb, rank, list(sl.names), sl.sizes, rtol * smax)
            causes += relu_causes(model, inputs)
    summary = SliceSummary(
        sl.size,
        tuple(zip(sl.names, sl.sizes)),
        measured,
        orb.lower,
        orb.upper,
        orb.rows,
        orb.factors,
    )
    return CertifyReport(
        verdict=verdict,
        n_params=sl.size,
        symmetry_dim=orb.lower,
        functional_dimension=rank,
        unexplained=unexplained,
        exact=orb.exact or orb.lower == measured,
        method="exact",
        tangent_residuals=checks.residuals,
        act_error=checks.act_error,
        act_tol=checks.act_tol,
        rtol=rtol,
        wrong=tuple(wrong),
        reasons=tuple(wrong.values()),
        gap=fd_gap,
        sigma_max=smax,
        causes=tuple(causes),
        notes=tuple(notes),
        memory_estimate=need,
        memory_budget=budget,
        timings=timings,
        slice=summary,
    )
