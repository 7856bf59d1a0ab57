"""`certify(model, inputs)`: do the discovered symmetries explain every redundancy?"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from .._errors import GaugeError
from ..groups import GaugeGroup
from ._causes import layernorm_causes, relu_causes, tied_causes
from ._functional_dimension import functional_dimension
from ._matrix_free import matrix_free_certificate

__all__ = ["CertifyReport", "certify"]


@dataclass(frozen=True)
class CertifyReport:
    """The outcome of `certify`.

    - `n_params`, `functional_dimension`, `symmetry_dim`.
    - `unexplained = n_params − functional_dimension − symmetry_dim`: 0 when the symmetries
      explain every redundancy, > 0 for hidden redundancy (see `causes`), < 0 is a bug.
    - `method`: `"exact"` (rank of the Jacobian) or `"matrix-free"` (preconditioned
      Davidson on the complement of the orbit tangents, see `matrix_free_certificate`;
      there `functional_dimension` is `n_params − rank(tangents)` when
      `sigma_min / sigma_max > max(rtol, 10⁻⁶)`, one less otherwise, which then only
      means "at least one more null direction").
    - `gap`: the singular-value gap at the rank (exact) or `sigma_min / sigma_max`.
    - `causes`: explanations found for hidden redundancy (dead or always-active units,
      LayerNorms whose `eps` is below the rank tolerance, tied weights).
    """

    n_params: int
    functional_dimension: int
    symmetry_dim: int
    unexplained: int
    method: str
    gap: float
    sigma_min: float | None = None
    causes: tuple[str, ...] = field(default=())
    #: matrix-free only: whether the smallest Ritz pair converged (its residual below `tol`
    #: times the Ritz value, or the Ritz value itself numerically zero); when not,
    #: `sigma_min` is only an upper bound and the outcome is inconclusive
    converged: bool = True

    @property
    def ok(self) -> bool:
        return self.unexplained == 0 and self.converged

    def lines(self) -> list[str]:
        out = [
            f"parameters            {self.n_params}",
            f"functional dimension  {self.functional_dimension} ({self.method})",
            f"symmetry dimension    {self.symmetry_dim}",
            f"unexplained           {self.unexplained}",
            f"singular-value gap    {self.gap:.3e}",
        ]
        if not self.converged:
            out.append(
                "the eigensolver did not converge: sigma_min is only an upper bound, the "
                "certificate is inconclusive (raise max_iter)"
            )
        if self.unexplained > 0:
            out.append("hidden redundancy: " + ("; ".join(self.causes) or "cause not found"))
        elif self.unexplained < 0:
            out.append("negative: the symmetry count exceeds the redundancy (a bug)")
        return out


def certify(
    model: nn.Module,
    inputs: Any,
    *,
    group: GaugeGroup | None = None,
    method: Literal["auto", "exact", "matrix-free"] = "auto",
    rtol: float = 1e-9,
    max_iter: int = 2000,
    tol: float = 1e-2,
) -> CertifyReport:
    """Compare the functional dimension of `model` on `inputs` with its symmetries.

    **Arguments:**

    - `model`, `inputs`: as for `functional_dimension` (enough inputs that the outputs
      outnumber the parameters).
    - `group`: the symmetries; default `gaugenet.symmetries(model, inputs)`.
    - `method`: `"exact"` materializes the Jacobian; `"matrix-free"` runs
      `matrix_free_certificate`; `"auto"` is exact up to 20 000 parameters.
    - `rtol`: relative threshold for a zero singular value (matrix-free: `max(rtol, 10⁻⁶)`
      for `sigma_min / sigma_max`: it works with `JᵀJ`, whose rounding hides singular
      values under about `10⁻⁷ σ_max`).
    - `max_iter`, `tol`: products with `JᵀJ` allowed, and the convergence fraction, for
      the matrix-free certificate.

    **Returns:** a `CertifyReport`.
    """
    if group is None:
        from ..discovery import symmetries

        group = symmetries(model, inputs)
    n_params = sum(p.numel() for p in model.parameters())
    if method == "auto":
        method = "exact" if n_params <= 20_000 else "matrix-free"
    if method == "exact":
        fd = functional_dimension(model, inputs, rtol=rtol)
        rank, gap, smin, converged = fd.rank, fd.gap, None, True
    elif method == "matrix-free":
        floor = max(rtol, 1e-6)
        mf = matrix_free_certificate(
            model, inputs, group, max_iter=max_iter, tol=tol, zero_tol=floor
        )
        smin, gap = mf.sigma_min, mf.sigma_min / mf.sigma_max
        off_orbit = n_params - mf.orbit_rank  # the rank if J is injective off the orbit
        rank = off_orbit if gap > floor else off_orbit - 1
        converged = mf.converged
    else:
        raise GaugeError(f"method must be 'auto', 'exact' or 'matrix-free', not {method!r}")
    unexplained = n_params - rank - group.dim
    causes = ()
    if unexplained > 0:
        found = relu_causes(model, inputs) + tied_causes(model)
        causes = tuple(found + layernorm_causes(model, inputs, rtol))
    return CertifyReport(
        n_params, rank, group.dim, unexplained, method, gap, smin, causes, converged
    )
