"""Batched matrix exponential for Magnus steps: one Taylor degree and one scaling for the batch.

`torch.linalg.matrix_exp` picks a Taylor degree per matrix and regroups the batch by degree,
which costs several copies and more products than the small-norm exponents of Magnus steps
need. Here the whole batch shares one evaluation: the degree-12 Taylor polynomial by the
Paterson-Stockmeyer scheme (5 matrix products), with the scaling `2^-s` chosen from
`α = max(‖X³‖^{1/3}, ‖X⁴‖^{1/4})` in the Frobenius norm (Al-Mohy and Higham's bound of the
truncated series by the powers' norms, valid in any submultiplicative norm and much tighter
than `‖X‖` for non-normal matrices), then `s` squarings. The powers are computed once:
the scaling only changes the polynomial's coefficients, since `(2^-s X)^k = 2^-sk X^k`.
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
    Besides the five products the evaluation is a few whole-batch kernels with few
    temporaries: the three degree-3 blocks are accumulated in place (their coefficients carry
    the scaling `2^-s`, exactly: it is a power of two).
    """
    d = X.shape[-1]
    if X.numel() == 0:
        return X.clone()
    shape = X.shape
    X = X.reshape(-1, d, d)
    X2 = X @ X
    X3 = X2 @ X
    X4 = X2 @ X2
    with torch.no_grad():
        # Frobenius norms: submultiplicative, one fused reduction each, one host sync.
        norms = [torch.linalg.matrix_norm(P).amax() for P in (X3, X4)]
        n3, n4 = torch.stack(norms).tolist()
    alpha = max(n3 ** (1 / 3), n4 ** (1 / 4))
    if not math.isfinite(alpha):
        return torch.linalg.matrix_exp(X).reshape(shape)  # torch reports or propagates it
    theta = _theta(torch.finfo(X.dtype).eps)
    s = max(0, math.ceil(math.log2(alpha / theta))) if alpha > 0 else 0
    f = 2.0**-s
    c = [1.0 / math.factorial(k) for k in range(_DEGREE + 1)]
    # With Y = (fX)⁴: p = B0 + Y (B1 + Y (B2 + c12 Y)), B_j = Σ_{i<4} c[4j+i] (fX)^i; the
    # factors f^i of the block terms go into their coefficients (powers of two: exact).
    # Each block is one new tensor, accumulated in place.
    blocks = []
    for j in range(3):
        k = _BLOCK * j
        B = X3 * (c[k + 3] * f**3)
        B.add_(X2, alpha=c[k + 2] * f**2).add_(X, alpha=c[k + 1] * f)
        B.diagonal(dim1=-2, dim2=-1).add_(c[k])
        blocks.append(B)
    Y = X4 * f**4 if s else X4
    R = blocks[2].add_(Y, alpha=c[_DEGREE])
    R = blocks[1].baddbmm_(R, Y)  # in place into the fresh block: no copy
    R = blocks[0].baddbmm_(R, Y)
    for _ in range(s):
        R = R @ R
    return R.reshape(shape)
