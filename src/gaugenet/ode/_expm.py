"""Batched matrix exponential for Magnus steps: one Taylor degree and one scaling for the batch.

`torch.linalg.matrix_exp` picks a Taylor degree per matrix and regroups the batch by degree,
which costs several copies and more products than the small-norm exponents of Magnus steps
need. Here the whole batch shares one evaluation: the degree-12 Taylor polynomial by the
Paterson-Stockmeyer scheme (5 matrix products), with the scaling `2^-s` chosen from
`α = max(‖X³‖₁^{1/3}, ‖X⁴‖₁^{1/4})` (Al-Mohy and Higham's bound of the truncated series by
the powers' norms, which is much tighter than `‖X‖₁` for non-normal matrices), then `s`
squarings. The powers are computed once: scaling `X` by `2^-s` scales `X^k` by `2^-sk`.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

__all__ = ["expm"]

_DEGREE = 12
_BLOCK = 4  # Paterson-Stockmeyer block: X, X², X³ inside a block, Horner in X⁴


@cache
def _theta(eps: float) -> float:
    """Largest `θ` with `Σ_{k>12} θ^k / k! ≤ eps / 2`: the degree-12 remainder bound."""

    def tail(x: float) -> float:
        return sum(x**k / math.factorial(k) for k in range(_DEGREE + 1, _DEGREE + 30))

    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tail(mid) <= eps / 2 else (lo, mid)
    return lo


def expm(X: Tensor) -> Tensor:
    """`exp(X)` for a batch `X` of shape `(..., d, d)`; differentiable.

    The relative truncation error of every matrix is below the dtype's unit roundoff before
    squaring (as in scaling-and-squaring methods, `s` squarings can amplify rounding).
    """
    d = X.shape[-1]
    if X.numel() == 0:
        return X.clone()
    eye = torch.eye(d, dtype=X.dtype, device=X.device)
    X2 = X @ X
    X3 = X2 @ X
    X4 = X2 @ X2
    with torch.no_grad():
        n3 = float(torch.linalg.matrix_norm(X3, 1).max()) ** (1 / 3)
        n4 = float(torch.linalg.matrix_norm(X4, 1).max()) ** (1 / 4)
    alpha = max(n3, n4)
    if not math.isfinite(alpha):
        return torch.linalg.matrix_exp(X)  # let torch report or propagate non-finite input
    theta = _theta(torch.finfo(X.dtype).eps)
    s = max(0, math.ceil(math.log2(alpha / theta))) if alpha > 0 else 0
    if s:
        f = 2.0**-s
        X, X2, X3, X4 = X * f, X2 * f**2, X3 * f**3, X4 * f**4
    c = [1.0 / math.factorial(k) for k in range(_DEGREE + 1)]
    powers = torch.stack([X, X2, X3], dim=0)

    def block(j: int) -> Tensor:
        k = _BLOCK * j
        coef = torch.tensor(c[k + 1 : k + _BLOCK], dtype=X.dtype, device=X.device)
        return torch.tensordot(coef, powers, dims=1) + c[k] * eye

    # p(X) = B0 + X⁴ (B1 + X⁴ (B2 + c12 X⁴)), with B_j the degree-3 blocks.
    R = block(2) + c[_DEGREE] * X4
    R = torch.baddbmm(block(1).reshape(-1, d, d), R.reshape(-1, d, d), X4.reshape(-1, d, d))
    R = torch.baddbmm(block(0).reshape(-1, d, d), R, X4.reshape(-1, d, d))
    R = R.reshape(X.shape)
    for _ in range(s):
        R = R @ R
    return R
