"""Batched matrix exponential for Magnus steps: one Taylor degree and one scaling for the batch.

`torch.linalg.matrix_exp` picks a Taylor degree per matrix and regroups the batch by degree,
which costs several copies and more products than the small-norm exponents of Magnus steps
need. Here the whole batch shares one evaluation, the cheapest of

| degree | products (with `X²`) | scheme |
|---|---|---|
| 2 | 1 | `1 + X + X²/2` |
| 4 | 2 | `1 + X + X² (1/2 + X/6 + X²/24)` |
| 8 | 3 | Bader, Blanes and Casas (2019): `X⁸`-level terms from two products |
| 12 | 5 | Paterson-Stockmeyer in blocks of `X, X², X³`, Horner in `X⁴` |

plus `s` squarings of the scaled `2^-s X`, that keeps the Taylor remainder below `tol`. The
remainder `Σ_{k>m} ‖X^k‖/k!` is bounded by the norms of `X` and `X²` alone (`‖X^{2j}‖ ≤
‖X²‖^j`, `‖X^{2j+1}‖ ≤ ‖X‖ ‖X²‖^j` in the Frobenius norm, submultiplicative), much tighter
than `‖X‖^k` for non-normal matrices. The scaling only changes the polynomial's
coefficients, since `(2^-s X)^k = 2^-sk X^k`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["expm", "expm_plan"]

#: degree -> products, including `X²`
_COST = {2: 1, 4: 2, 8: 3, 12: 5}
_MAX_SQUARINGS = 64

# Bader, Blanes and Casas, "Computing the matrix exponential with an optimized Taylor
# polynomial approximation" (Mathematics 7, 2019), the degree-8 scheme with x3 = 2/3:
# A4 = X² (x1 X + x2 X²), A8 = (x3 X² + A4)(x4 + x5 X + x6 X² + x7 A4),
# T8 = 1 + X + y2 X² + A8. Checked in the tests against the Taylor coefficients.
_R = math.sqrt(177.0)
_X3 = 2.0 / 3.0
_T8 = {
    "x1": _X3 * (1 + _R) / 88,
    "x2": _X3 * (1 + _R) / 352,
    "x3": _X3,
    "x4": (-271 + 29 * _R) / (315 * _X3),
    "x5": 11 * (-1 + _R) / (1260 * _X3),
    "x6": 11 * (-9 + _R) / (5040 * _X3),
    "x7": (89 - _R) / (5040 * _X3**2),
    "y2": (857 - 58 * _R) / 630,
}


#: `1 / (m + 1)!` for the degrees of `_COST`
_INV_FACT = {m: 1.0 / math.factorial(m + 1) for m in _COST}


def _tail(m: int, n1: float, n2: float, f: float) -> float:
    """A bound of `Σ_{k>m} ‖(f X)^k‖ / k!` from `n1 = ‖X‖`, `n2 = ‖X²‖`: with `β = f √n2`
    and `ρ = max(1, n1 / √n2)`, every term is at most `ρ β^k / k!`, and the geometric
    bound of the tail after its first term."""
    if n1 == 0.0:
        return 0.0
    root = math.sqrt(n2)
    rho = max(1.0, n1 / root) if root > 0 else math.inf
    if not math.isfinite(rho):  # X² = 0: exp(fX) = 1 + fX exactly, every degree is exact
        return 0.0
    beta = f * root
    ratio = beta / (m + 2)
    if ratio >= 1.0:
        return math.inf
    return rho * beta ** (m + 1) * _INV_FACT[m] / (1.0 - ratio)


def expm_plan(n1: float, n2: float, tol: float) -> tuple[int, int]:
    """The `(degree, squarings)` with the fewest products whose Taylor remainder for a matrix
    with `‖X‖ = n1`, `‖X²‖ = n2` is at most `tol` (ties: the higher degree)."""
    best: tuple[int, int, int] | None = None
    root = math.sqrt(n2) if math.isfinite(n2) else math.inf
    # Highest degree first: its few squarings bound the search of the lower degrees, which
    # need many (the pick, the least key, does not depend on the order).
    for m, cost in reversed(_COST.items()):
        # Squarings below `log2(√n2 / (m + 2))` leave a divergent bound: start above them.
        start = max(0, math.ceil(math.log2(root / (m + 2)))) if root > 0 else 0
        for s in range(min(start, _MAX_SQUARINGS), _MAX_SQUARINGS):
            if best is not None and cost + s > best[0]:
                break
            if _tail(m, n1, n2, 2.0**-s) <= tol:
                key = (cost + s, -m, s)
                best = key if best is None or key < best else best
                break
    if best is None:
        raise ValueError("expm: no Taylor degree reaches the tolerance")
    return -best[1], best[2]


def _norms(X: Tensor, X2: Tensor) -> tuple[float, float]:
    """The largest Frobenius norms of `X` and `X²` over the batch (one host sync)."""
    with torch.no_grad():
        n = torch.stack([torch.linalg.matrix_norm(P).amax() for P in (X, X2)])
        n1, n2 = n.tolist()
    return n1, n2


def _identity_plus(X: Tensor, a: float, c0: float = 1.0) -> Tensor:
    """`c0 + a X` as a new tensor."""
    out = X * a
    out.diagonal(dim1=-2, dim2=-1).add_(c0)
    return out


def _taylor2(X: Tensor, X2: Tensor, f: float) -> Tensor:
    return _identity_plus(X, f).add_(X2, alpha=0.5 * f * f)


def _taylor4(X: Tensor, X2: Tensor, f: float) -> Tensor:
    # 1 + fX + (fX)² (1/2 + fX/6 + (fX)²/24), the factors f carried by the second factor.
    inner = _identity_plus(X, f**3 / 6, 0.5 * f**2).add_(X2, alpha=f**4 / 24)
    return _identity_plus(X, f).baddbmm_(X2, inner)


def _taylor8(X: Tensor, X2: Tensor, f: float) -> Tensor:
    c = _T8
    # Scaled: A4 = (fX)² (x1 fX + x2 (fX)²) = X² (x1 f³ X + x2 f⁴ X²).
    A4 = torch.bmm(X2, torch.add(X * (c["x1"] * f**3), X2, alpha=c["x2"] * f**4))
    left = torch.add(A4, X2, alpha=c["x3"] * f**2)
    right = _identity_plus(X, c["x5"] * f, c["x4"]).add_(X2, alpha=c["x6"] * f**2)
    right = right.add_(A4, alpha=c["x7"])
    out = _identity_plus(X, f).add_(X2, alpha=c["y2"] * f**2)
    return out.baddbmm_(left, right)


def _taylor12(X: Tensor, X2: Tensor, f: float) -> Tensor:
    # Paterson-Stockmeyer: with Y = (fX)⁴, p = B0 + Y (B1 + Y (B2 + c12 Y)),
    # B_j = Σ_{i<4} c[4j+i] (fX)^i; the factors f^i go into the coefficients (powers of two).
    X3 = torch.bmm(X2, X)
    X4 = torch.bmm(X2, X2)
    c = [1.0 / math.factorial(k) for k in range(13)]
    blocks = []
    for j in range(3):
        k = 4 * j
        B = X3 * (c[k + 3] * f**3)
        B.add_(X2, alpha=c[k + 2] * f**2).add_(X, alpha=c[k + 1] * f)
        B.diagonal(dim1=-2, dim2=-1).add_(c[k])
        blocks.append(B)
    Y = X4 * f**4 if f != 1.0 else X4
    R = blocks[2].add_(Y, alpha=c[12])
    R = blocks[1].baddbmm_(R, Y)  # in place into the fresh block: no copy
    return blocks[0].baddbmm_(R, Y)


_SCHEMES = {2: _taylor2, 4: _taylor4, 8: _taylor8, 12: _taylor12}


def expm(X: Tensor, tol: float | None = None) -> Tensor:
    """`exp(X)` for a batch `X` of shape `(..., d, d)`; differentiable.

    `tol` bounds the Taylor remainder of the scaled exponential (before squaring), relative
    to `‖exp(2^-s X)‖ ≈ 1`: default the dtype's unit roundoff, so that the result is as
    accurate as scaling and squaring can make it (`s` squarings can amplify rounding). A
    larger `tol` (a Magnus step inside a tolerance) lets the batch use a lower degree and
    fewer products. The degree and scaling are chosen for the batch's largest norms.
    """
    d = X.shape[-1]
    if X.numel() == 0:
        return X.clone()
    shape = X.shape
    X = X.reshape(-1, d, d)
    X2 = torch.bmm(X, X)
    n1, n2 = _norms(X, X2)
    if not (math.isfinite(n1) and math.isfinite(n2)):
        return torch.linalg.matrix_exp(X).reshape(shape)  # torch reports or propagates it
    eps = torch.finfo(X.dtype).eps / 2
    degree, s = expm_plan(n1, n2, eps if tol is None else max(tol, eps))
    R = _SCHEMES[degree](X, X2, 2.0**-s)
    for _ in range(s):
        R = torch.bmm(R, R)
    return R.reshape(shape)
