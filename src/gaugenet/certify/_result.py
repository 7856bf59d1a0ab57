"""The outcome of `certify`: a verdict, the dimensions behind it and the measurements."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._slice_certify import SliceSummary

__all__ = ["CertifyReport", "Verdict"]


class Verdict(str, Enum):
    """What `certify` concludes, from strongest to weakest claim.

    - `wrong`: some factor is no symmetry: its orbit tangents leave `ker J`, acting with it
      changes the outputs, or its action or tangents raise (`CertifyReport.wrong` names
      the factors). Takes precedence over everything else.
    - `complete`: every factor is right **and** the exact rank shows
      `dim = n_params − rank J`: the symmetries explain every redundancy on the inputs.
    - `incomplete`: every factor is right and at least `missing` directions of `ker J` are
      not orbit tangents (exact count, or a certified lower bound).
    - `right`: every factor is right; completeness is not settled (the matrix-free bound
      found no missing direction, which is no proof, or no completeness test ran).
    """

    WRONG = "wrong"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    RIGHT = "right"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CertifyReport:
    """The outcome of `certify`.

    - `verdict`: a `Verdict` (see there).
    - `n_params`, `symmetry_dim` (the group's `dim`), `functional_dimension` (the rank of
      `J`: exact, or `n_params − symmetry_dim − missing` for a bound, `None` when no
      completeness test ran).
    - `unexplained`: `n_params − functional_dimension − symmetry_dim`, the missing
      dimension; `exact` says whether it is the exact count or a certified lower bound
      (`missing ≥ unexplained`); `None` when no completeness test ran.
    - `method`: `"exact"` (rank of the materialized Jacobian), `"matrix-free"`
      (preconditioned Davidson off the orbit, a bound) or `"checks"` (only the per-factor
      checks: the reason is in `notes`).
    - `tangent_residuals`: per continuous factor, `‖J Tᵀ‖_F / (‖J‖₂ ‖T‖_F)` over random
      combinations `T` of its orbit tangents (measured, float64); a symmetry has it at
      rounding level, below `rtol`.
    - `act_error`: the largest relative output change `max|f(g·θ) − f(θ)| / max|f(θ)|`
      for a random group element `g` (in the model's dtype), `act_tol` its tolerance.
    - `wrong`: the factors found wrong, `reasons` the matching explanations.
    - `gap`, `sigma_min`, `sigma_max`, `converged`: the singular-value gap at the rank
      (exact) or `sigma_min / sigma_max` off the orbit (matrix-free, where `converged` says
      whether the smallest Ritz pair converged).
    - `causes`: explanations found for hidden redundancy. With the exact method, first the
      missing directions attributed by projection to measured causes (entries never read or
      read only together, layers fed by a table, LayerNorms with a tiny `eps`; see
      `locate_gap`), each with its dimension, then the unexplained rest by parameter; then
      the causes only listed (dead or always-active units, tied weights, modules whose
      symmetries are not analysed; without the Jacobian also tiny `eps` and table-fed
      layers); `notes`: what else the reader must know.
    - `memory_estimate`: bytes the chosen method was estimated to need, `memory_budget`
      the budget; `timings`: seconds per stage.
    - `slice`: for a slice certificate (`certify(..., params=...)`), what it measured
      (`SliceSummary`); then `n_params` is the slice's size, `symmetry_dim` the orbit
      directions inside it (a lower bound unless `slice.discovered_upper` equals it) and
      `functional_dimension` the rank of the slice's columns `J_S`; `None` otherwise.
    """

    verdict: Verdict
    n_params: int
    symmetry_dim: int
    functional_dimension: int | None
    unexplained: int | None
    exact: bool
    method: str
    tangent_residuals: dict[str, float] = field(default_factory=dict)
    act_error: float = 0.0
    act_tol: float = 0.0
    rtol: float = 1e-9
    wrong: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    gap: float = math.nan
    sigma_min: float | None = None
    sigma_max: float | None = None
    converged: bool = True
    causes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    memory_estimate: int = 0
    memory_budget: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    slice: SliceSummary | None = None

    @property
    def ok(self) -> bool:
        """`verdict == "complete"`."""
        return self.verdict is Verdict.COMPLETE

    @property
    def worst_residual(self) -> float:
        """The largest tangent residual (0 without continuous factors)."""
        return max(self.tangent_residuals.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable data (the verdict as its string)."""
        out = asdict(self)
        out["verdict"] = self.verdict.value
        out["wrong"], out["reasons"] = list(self.wrong), list(self.reasons)
        out["causes"], out["notes"] = list(self.causes), list(self.notes)
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()
        }

    def __repr__(self) -> str:
        missing = (
            "n/a"
            if self.unexplained is None
            else (f"{self.unexplained}" if self.exact else f">={self.unexplained}")
        )
        wrong = f", wrong={list(self.wrong)}" if self.wrong else ""
        return (
            f"CertifyReport(verdict={self.verdict.value!r}, method={self.method!r}, "
            f"n_params={self.n_params}, symmetry_dim={self.symmetry_dim}, "
            f"missing={missing}, worst_residual={self.worst_residual:.1e}, "
            f"act_error={self.act_error:.1e}{wrong})"
        )

    def lines(self) -> list[str]:
        """A readable account, one line per item."""
        kind = "exact" if self.exact else "lower bound"
        out = [f"verdict               {self.verdict.value}"]
        if self.slice is not None:
            out.append(f"slice entries         {self.n_params} (the other entries frozen)")
        else:
            out.append(f"parameters            {self.n_params}")
        out.append(f"symmetry dimension    {self.symmetry_dim}")
        if self.functional_dimension is not None:
            out.append(f"functional dimension  {self.functional_dimension} ({self.method})")
        if self.unexplained is not None:
            out.append(f"unexplained           {self.unexplained} ({kind})")
        else:
            out.append("unexplained           not tested (see notes)")
        if math.isfinite(self.gap):
            out.append(f"singular-value gap    {self.gap:.3e}")
        out.append(
            f"tangent residuals     max {self.worst_residual:.1e} over "
            f"{len(self.tangent_residuals)} factors (tolerance {self.rtol:.0e})"
        )
        out.append(f"act check             {self.act_error:.1e} (tolerance {self.act_tol:.0e})")
        for name, why in zip(self.wrong, self.reasons):
            out.append(f"wrong factor {name}: {why}")
        if not self.converged:
            out.append(
                "the eigensolver did not converge: sigma_min is only an upper bound "
                "(raise max_iter)"
            )
        if self.unexplained is not None and self.unexplained > 0:
            out.append("hidden redundancy: " + ("; ".join(self.causes) or "cause not found"))
        elif self.causes:
            out.append("note: " + "; ".join(self.causes))
        out += [f"note: {n}" for n in self.notes]
        total = sum(self.timings.values())
        out.append(
            f"time {total:.1f} s, memory estimate {self.memory_estimate / 1e9:.2f} GB "
            f"(budget {self.memory_budget / 1e9:.2f} GB)"
        )
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())
