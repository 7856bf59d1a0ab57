"""Magnus steps of one line in numpy: the same exponents, exponential and product, no kernels.

At small `d` a fixed-step Magnus solve of one interval (or of the three intervals of a
refinement pair) is a few dozen `d × d` products and combinations, each of which costs a
torch kernel's dispatch (several µs) where numpy's call costs one or two. On the CPU, in
float32 or float64, without a graph through the field, `steps_product` hands such small
solves to `numpy_steps_product`: the same exponents `Ω` (`Magnus4`, `Magnus6`), the same
Taylor degree and scaling (`expm_plan` on the same norms) and the same ordered product tree,
so the line equals the torch path's to rounding and every step-count decision is taken on
the same figures. Whether numpy is used is decided by the same measurement as RK8's
single-line stages (`faster_backend`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._expm import _T8, expm_plan
from ._magnus import Magnus4, Magnus6, MagnusMethod
from ._products import ordered_product
from ._rk_backend import NUMPY_DTYPES, TIMED_MAX_DIM, faster_backend
from ._rk_numpy import as_numpy

__all__ = [
    "NUMPY_MAX_INTERVALS",
    "NUMPY_SMALL",
    "numpy_expm",
    "numpy_small",
    "numpy_steps",
    "numpy_steps_product",
]

#: batches of up to this many intervals (one line's refinement pair: three) may run on numpy
NUMPY_MAX_INTERVALS = 3


#: elementwise combinations and products of lines up to this many entries may run on numpy
NUMPY_SMALL = 2**14


def numpy_small(*xs: Tensor) -> bool:
    """Whether tensors of lines are few and small enough for numpy (no kernels): on the CPU,
    one float dtype, no graph, at most `NUMPY_SMALL` entries each."""
    dtype = xs[0].dtype
    return all(
        x.device.type == "cpu"
        and x.dtype == dtype
        and dtype in NUMPY_DTYPES
        and not x.requires_grad
        and x.numel() <= NUMPY_SMALL
        for x in xs
    )


def numpy_steps(A: Tensor, h: Tensor, method: MagnusMethod) -> bool:
    """Whether the steps from node values `A` `(B, n, s, d, d)` and lengths `h` `(B,)` run
    on numpy: few intervals without extra axes, on the CPU, one float dtype, no graph, a
    method of this module, and numpy measured faster for `d` (`faster_backend`)."""
    return (
        type(method) in _OMEGAS
        and A.dim() == 5
        and 0 < h.shape[0] <= NUMPY_MAX_INTERVALS
        and A.device.type == "cpu"
        and h.device.type == "cpu"
        and A.dtype in NUMPY_DTYPES
        and h.dtype == A.dtype
        and not (A.requires_grad or h.requires_grad)
        and A.shape[-1] > 0
        and faster_backend(A.dtype, min(A.shape[-1], TIMED_MAX_DIM)) == "numpy"
    )


def numpy_steps_product(
    A: Tensor, h: Tensor, method: MagnusMethod, exp_tol: float | None
) -> Tensor:
    """`_magnus_steps.steps_product` in numpy (see `numpy_steps` for when it applies):
    `A` `(B, n, s, d, d)`, `h` `(B,)` → the lines `(B, d, d)`."""
    An, hn = as_numpy(A), as_numpy(h)
    B, n, d = An.shape[0], An.shape[1], An.shape[-1]
    # Overflow and non-finite values propagate silently, as in torch: callers diagnose them
    # on the reductions they take anyway.
    with np.errstate(all="ignore"):
        omega = _OMEGAS[type(method)](An, hn)
        steps = numpy_expm(omega.reshape(B * n, d, d), exp_tol).reshape(B, n, d, d)
        W = ordered_product(steps)
    return torch.from_numpy(np.ascontiguousarray(W))


def _moments(A: np.ndarray, h: np.ndarray, M: np.ndarray) -> np.ndarray:
    """`h Σ_j M[k][j] A[:, :, j]` for each row `k` of `M`: `(B, n, k, d, d)`, one product."""
    B, n, s, d = A.shape[0], A.shape[1], A.shape[2], A.shape[-1]
    out = np.matmul(M.astype(A.dtype), A.reshape(B * n, s, d * d))
    out = out.reshape(B, n, M.shape[0], d, d)
    out *= h.reshape(B, 1, 1, 1, 1)
    return out


_M4 = np.array(((0.5, 0.5), (-math.sqrt(3) / 12, math.sqrt(3) / 12)))


def _magnus4(A: np.ndarray, h: np.ndarray) -> np.ndarray:
    # As `Magnus4.omega`: the mean and the scaled difference, one commutator.
    al = _moments(A, h, _M4)
    mean, diff = al[:, :, 0], al[:, :, 1]
    return diff @ mean - mean @ diff + mean


_M6 = np.array(Magnus6._MOMENTS)


def _magnus6(A: np.ndarray, h: np.ndarray) -> np.ndarray:
    # As `Magnus6._omega`: Legendre moments, then three commutators.
    al = _moments(A, h, _M6)
    al1, al2, al3 = al[:, :, 0], al[:, :, 1], al[:, :, 2]
    c1 = al1 @ al2 - al2 @ al1
    y = c1 + 2.0 * al3
    c2 = (y @ al1 - al1 @ y) * (1.0 / 60)
    u = c1 - 20.0 * al1 - al3
    v = c2 + al2
    return (u @ v - v @ u) * (1.0 / 240) + al1 + al3 * (1.0 / 12)


_OMEGAS = {Magnus4: _magnus4, Magnus6: _magnus6}


def _plus_identity(X: np.ndarray, c0: float) -> np.ndarray:
    """`X + c0` (on the diagonal), in place."""
    d = X.shape[-1]
    X.reshape(-1, d * d)[:, :: d + 1] += c0
    return X


def numpy_expm(X: np.ndarray, tol: float | None) -> np.ndarray:
    """`_expm.expm` in numpy for `X` `(N, d, d)` (contiguous): the same degree and scaling
    from the same norms; non-finite norms go to `torch.linalg.matrix_exp`, as there."""
    X2 = X @ X
    N = X.shape[0]
    n1 = math.sqrt(float((X * X).reshape(N, -1).sum(1).max()))
    n2 = math.sqrt(float((X2 * X2).reshape(N, -1).sum(1).max()))
    if not (math.isfinite(n1) and math.isfinite(n2)):
        return torch.linalg.matrix_exp(torch.from_numpy(X)).numpy()
    eps = float(np.finfo(X.dtype).eps) / 2
    degree, s = expm_plan(n1, n2, eps if tol is None else max(tol, eps))
    f = 2.0**-s
    if degree == 2:
        R = _plus_identity(X * f + X2 * (0.5 * f * f), 1.0)
    elif degree == 4:
        inner = _plus_identity(X * (f**3 / 6) + X2 * (f**4 / 24), 0.5 * f**2)
        R = _plus_identity(X * f, 1.0) + X2 @ inner
    elif degree == 8:
        c = _T8
        A4 = X2 @ (X * (c["x1"] * f**3) + X2 * (c["x2"] * f**4))
        left = A4 + X2 * (c["x3"] * f**2)
        right = _plus_identity(X * (c["x5"] * f) + X2 * (c["x6"] * f**2), c["x4"])
        right += A4 * c["x7"]
        R = _plus_identity(X * f + X2 * (c["y2"] * f**2), 1.0) + left @ right
    else:  # 12: Paterson-Stockmeyer, as `_taylor12`
        X3, X4 = X2 @ X, X2 @ X2
        k = [1.0 / math.factorial(i) for i in range(13)]
        blocks = [
            _plus_identity(
                X3 * (k[4 * j + 3] * f**3) + X2 * (k[4 * j + 2] * f**2) + X * (k[4 * j + 1] * f),
                k[4 * j],
            )
            for j in range(3)
        ]
        Y = X4 * f**4
        R = blocks[2] + Y * k[12]
        R = blocks[1] + R @ Y
        R = blocks[0] + R @ Y
    for _ in range(s):
        R = R @ R
    return R
