"""Matrix-free certification: the smallest singular value of the Jacobian off the orbit.

Let `J` be the parameter-to-output Jacobian and `Q` an orthonormal basis of the orbit
tangents (the symmetry directions, all in `ker J`). If the symmetries explain every
redundancy, `J` is injective on `Q^⊥`, i.e.

$$\\sigma_{\\min}(J|_{Q^\\perp}) = \\min_{v \\perp Q, |v|=1} |J v| > 0 .$$

It is the square root of the smallest eigenvalue of `A = P JᵀJ P` on `Q^⊥`
(`P = 1 − Q Qᵀ`). `A` is applied with one Jacobian-vector product (forward mode) and one
vector-Jacobian product (reverse mode): the Jacobian is never formed.

The bottom of that spectrum is hard for unpreconditioned Krylov methods: for a ReLU MLP
the condition number is about 10⁵ to 10⁶ and the smallest eigenvalues are clustered, so
Lanczos needs thousands of steps. Here a preconditioned Davidson method (GD+k) finds it,
with a Kronecker-factored (K-FAC) approximation of the inverse of each `nn.Linear`
layer's diagonal block of `JᵀJ` as preconditioner (a Jacobi diagonal for every other
parameter); see `matrix_free_certificate`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from .._func import untransformable
from ..groups import GaugeGroup
from ._autograd import AutogradProducts, or_autograd
from ._davidson import lanczos_max, smallest
from ._jacobian import FlatModel, flat_model, measuring
from ._kfac import preconditioner
from ._orbit import Orbit, orbit_projector

__all__ = ["MatrixFreeResult", "gauss_newton", "linear_jvp", "matrix_free_certificate"]

Operator = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MatrixFreeResult:
    """The outcome of `matrix_free_certificate`.

    - `sigma_min`: `√θ`, `θ` the smallest Ritz value of `A = P JᵀJ P` on `Q^⊥`. A Ritz
      value is a Rayleigh quotient, so `sigma_min` is an **upper bound** of the true
      smallest singular value of `J` off the orbit.
    - `sigma_max`: the largest, from a few Lanczos steps (a lower bound, close).
    - `residual`: `‖A v − θ v‖` of the smallest Ritz pair `(θ, v)`, recomputed with a fresh
      product: some eigenvalue of `A` lies within it of `θ = sigma_min²`.
    - `iterations`: products with `A` spent on `sigma_min` (not counting the
      `sigma_max` estimate, the final fresh product and the preconditioner's setup).
    - `orbit_rank`: the rank of the orbit tangents.
    - `converged`: `residual ≤ tol · θ` (an eigenvalue lies in `[(1 − tol) θ, (1 + tol) θ]`),
      or `θ ≤ zero_tol² · sigma_max²` (then `J` is certainly numerically singular off
      the orbit, since `θ` bounds the smallest eigenvalue from above).
    - `tol`: the fraction used; `preconditioner`: what preconditioned the iteration.
    """

    sigma_min: float
    sigma_max: float
    residual: float
    iterations: int
    orbit_rank: int
    converged: bool = False
    tol: float = 0.0
    preconditioner: str = "none"


# -- the operator --------------------------------------------------------------


def linear_jvp(fm: FlatModel, *, trace: bool = True) -> Operator:
    """`v ↦ J v` for `v` `(n,)`: a linearized forward-mode product (traced once, replayed)
    or, where tracing fails or `trace` is false (a few products only: no tape kept),
    `torch.func.jvp`; plain autograd (`AutogradProducts`) where `torch.func` cannot
    transform the model."""
    try:
        if not trace:
            raise NotImplementedError
        with warnings.catch_warnings(), measuring():
            warnings.simplefilter("ignore")
            _, jvp_fn = torch.func.linearize(fm.f, fm.theta)
            jvp_fn(torch.zeros_like(fm.theta))
    except Exception:  # data-dependent control flow and other untraceable models

        def func_jvp(v: Tensor) -> Tensor:
            with measuring():
                return torch.func.jvp(fm.f, (fm.theta,), (v,))[1]

        jvp_fn = or_autograd(func_jvp, lambda: AutogradProducts(fm).jvp)

    return jvp_fn


def gauss_newton(fm: FlatModel, proj: Orbit, jvp_fn: Operator | None = None) -> Operator:
    """`v ↦ P Jᵀ J P v` for `v` `(n,)`: `linear_jvp` (or the given `jvp_fn`), then one
    reverse-mode product (plain autograd, both, where `torch.func` cannot transform the
    model)."""
    try:
        with measuring():
            _, func_vjp = torch.func.vjp(fm.f, fm.theta)
    except RuntimeError as exc:
        if not untransformable(exc):
            raise
        auto = AutogradProducts(fm)
        vjp_fn: Operator = auto.vjp
        jvp_fn = jvp_fn if jvp_fn is not None else auto.jvp
    else:

        def vjp_fn(u: Tensor) -> Tensor:
            with measuring():
                return func_vjp(u)[0]

        jvp_fn = jvp_fn if jvp_fn is not None else linear_jvp(fm)

    def op(v: Tensor) -> Tensor:
        v = proj(v)
        return proj(vjp_fn(jvp_fn(v)))

    return op


def matrix_free_certificate(
    model: nn.Module,
    inputs: Any,
    group: GaugeGroup,
    *,
    max_iter: int = 2000,
    tol: float = 1e-2,
    zero_tol: float = 1e-6,
    precondition: bool = True,
    generator: torch.Generator | None = None,
) -> MatrixFreeResult:
    """The smallest singular value of the Jacobian on the complement of the orbit, without
    forming the Jacobian.

    **Method.** `A = P JᵀJ P` is applied with `torch.func` products (`linearize` for `J v`,
    `vjp` for `Jᵀ u`), `P` the projector off the orbit tangents (kept sparse). Its
    smallest eigenvalue comes from a preconditioned Davidson iteration (GD+k: subspace up
    to 48 vectors, thick restarts keeping the 12 smallest Ritz vectors and the previous
    one), expanded each step with `M r`, `r` the residual of the smallest Ritz pair. `M`
    is block-diagonal: for each `nn.Linear` with its own weight, K-FAC,
    `(G ⊗ A + δ)⁻¹` with `A = Σ ã ãᵀ` over its inputs (a 1 appended for the bias) and `G`
    the mean of `g gᵀ` over its output gradients `g` for 16 random ±1 cotangents of the
    outputs, inverted through the eigendecompositions of `G` and `A`; for every other
    parameter the inverse of the diagonal of `JᵀJ` estimated from the same probes. Any
    positive definite `M` gives the same eigenvalues: it only changes the speed.
    `sigma_max` comes from 20 Lanczos steps.

    **What is guaranteed.** `sigma_min² = θ` is a Rayleigh quotient of `A` on `Q^⊥`, hence
    at least its smallest eigenvalue: `sigma_min` is an upper bound. `residual` is
    `‖A v − θ v‖` for the returned unit Ritz vector, recomputed at the end with a fresh
    product, and some eigenvalue of `A` lies in `[θ − residual, θ + residual]`.
    `converged` means `residual ≤ tol · θ`, i.e. an eigenvalue within the fraction `tol`
    of `θ`, so `A` is positive on a direction where `θ` says it is; or `θ ≤ zero_tol²
    σ_max²`, which proves that `J` is numerically singular off the orbit. **Not
    guaranteed:** that the eigenvalue in that band is the smallest one. An eigenvector
    with almost no component in the random start could be missed, as for every Krylov or
    Davidson method (it is unlikely, not excluded); the error of `θ` is about
    `residual² / gap` to the next eigenvalue, small only when that gap is not.

    **Arguments:**

    - `model`, `inputs`: evaluated in float64.
    - `group`: the symmetries whose orbit tangents are projected out.
    - `max_iter`: at most this many products with `A` for `sigma_min` (then one more for
      the final residual).
    - `tol`: the convergence fraction (see above).
    - `zero_tol`: `sigma_min / sigma_max` below which `J` is declared singular off the
      orbit (keep it above `√ε ≈ 1.5·10⁻⁸`: below, `θ` is rounding noise).
    - `precondition`: `False` runs the same iteration without preconditioner (for
      comparison: it needs many more products).
    - `generator`: for the random start and probes (default: seeded, reproducible).

    **Returns:** a `MatrixFreeResult`.
    """
    if max_iter < 1:
        raise GaugeError(f"max_iter must be at least 1, got {max_iter}")
    if not 0 < tol < 1:
        raise GaugeError(f"tol must be in (0, 1), got {tol}")
    if not zero_tol > 0:
        raise GaugeError(f"zero_tol must be positive, got {zero_tol}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    fm = flat_model(model, inputs)
    n = fm.theta.numel()
    proj = orbit_projector(model, group)
    if n - proj.rank == 0:
        raise GaugeError("the orbit tangents span every parameter: nothing to certify")
    op = gauss_newton(fm, proj)
    prec, kind = preconditioner(fm, gen=gen) if precondition else ((lambda v: v), "none")
    lmax = lanczos_max(op, proj(torch.randn(n, generator=gen, dtype=torch.float64)), 20)
    start = proj(prec(proj(torch.randn(n, generator=gen, dtype=torch.float64))))
    ritz = smallest(
        op,
        lambda r: proj(prec(r)),
        proj,
        start,
        lmax=lmax,
        max_iter=max_iter,
        tol=tol,
        zero_tol=zero_tol,
        gen=gen,
    )
    lmax = max(lmax, ritz.theta)
    return MatrixFreeResult(
        math.sqrt(max(ritz.theta, 0.0)),
        math.sqrt(max(lmax, 0.0)),
        ritz.residual,
        ritz.products,
        proj.rank,
        ritz.converged,
        tol,
        kind or "none",
    )
