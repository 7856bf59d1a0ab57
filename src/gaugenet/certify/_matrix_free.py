"""Matrix-free certification: the smallest singular value of the Jacobian off the orbit.

Let `J` be the parameter-to-output Jacobian and `Q` an orthonormal basis of the orbit
tangents (the symmetry directions, all in `ker J`). If the symmetries explain every
redundancy, `J` is injective on `Q^⊥`, i.e.

$$\\sigma_{\\min}(J|_{Q^\\perp}) = \\min_{v \\perp Q, |v|=1} |J v| > 0 .$$

It is the square root of the smallest eigenvalue of `P Jᵀ J P` on `Q^⊥` (`P = 1 − Q Qᵀ`),
which Lanczos iteration finds using only products `J v` (`torch.func.jvp`) and `Jᵀ u`
(`torch.func.vjp`): the Jacobian is never formed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..groups import GaugeGroup
from ._jacobian import as_flat_function

__all__ = ["MatrixFreeResult", "matrix_free_certificate"]


@dataclass(frozen=True)
class MatrixFreeResult:
    """`sigma_min`, `sigma_max` of `J` on the complement of the orbit; `residual` of the
    smallest Ritz pair (an eigenvalue of `P JᵀJ P` lies within it of `sigma_min²`);
    `iterations` done; `orbit_rank` the rank of the tangent vectors."""

    sigma_min: float
    sigma_max: float
    residual: float
    iterations: int
    orbit_rank: int


def _orbit_basis(model: nn.Module, group: GaugeGroup) -> Tensor:
    if group.dim == 0:
        n = sum(p.numel() for p in model.parameters())
        return torch.zeros(n, 0, dtype=torch.float64)
    tangents = group.tangent(copy.deepcopy(model).double())  # (dim, n_params)
    q, r = torch.linalg.qr(tangents.T)
    d = torch.diagonal(r).abs()
    keep = d > 1e-10 * d.max()
    return q[:, keep]


def matrix_free_certificate(
    model: nn.Module,
    inputs: Any,
    group: GaugeGroup,
    *,
    max_iter: int = 300,
    tol: float = 1e-8,
    generator: torch.Generator | None = None,
) -> MatrixFreeResult:
    """Lanczos (full reorthogonalization) on `P JᵀJ P` restricted to `Q^⊥`.

    **Arguments:**

    - `model`, `inputs`: evaluated in float64.
    - `group`: the symmetries whose orbit tangents are projected out.
    - `max_iter`: at most this many products with `JᵀJ`; stops earlier on breakdown or
      when the smallest Ritz value is converged to `tol` (relative).

    **Returns:** a `MatrixFreeResult`.
    """
    f, theta, _ = as_flat_function(model, inputs)
    q = _orbit_basis(model, group)
    _, vjp_fn = torch.func.vjp(f, theta)

    def proj(v: Tensor) -> Tensor:
        return v - q @ (q.T @ v)

    def op(v: Tensor) -> Tensor:
        v = proj(v)
        jv = torch.func.jvp(f, (theta,), (v,))[1]
        return proj(vjp_fn(jv)[0])

    n = theta.numel()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    v = proj(torch.randn(n, generator=gen, dtype=torch.float64))
    v = v / v.norm()
    basis, alphas, betas = [v], [], []
    theta_min, resid, prev = float("nan"), float("inf"), float("inf")
    m = min(max_iter, n - q.shape[1])
    for k in range(m):
        w = op(basis[-1])
        alphas.append(float(w @ basis[-1]))
        V = torch.stack(basis, 1)
        w = w - V @ (V.T @ w)
        w = w - V @ (V.T @ w)  # twice: keeps the basis orthogonal in floating point
        w = proj(w)
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        theta_min, theta_max = float(evals[0]), float(evals[-1])
        resid = abs(beta * float(evecs[-1, 0]))
        if beta < 1e-12 * max(theta_max, 1e-300) or (
            k > 10 and abs(prev - theta_min) <= tol * theta_max and resid <= tol * theta_max
        ):
            break
        prev = theta_min
        betas.append(beta)
        basis.append(w / beta)
    smin = max(theta_min, 0.0) ** 0.5
    return MatrixFreeResult(smin, max(theta_max, 0.0) ** 0.5, resid, len(alphas), q.shape[1])
