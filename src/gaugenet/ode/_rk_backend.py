"""Which BLAS runs the stages of a single `d × d` RK8 line on the CPU: torch's or numpy's.

An RK8 stage of one line is a product `w(t_i) Y_i` and a combination `Y + h Σ_j a_ij K_j`,
both BLAS calls. torch and numpy may link different BLAS libraries (MKL, OpenBLAS), whose
speeds for the same small product differ by tens of percent from machine to machine (torch's
MKL took 21 µs and numpy's OpenBLAS 16 µs for a 64 × 64 float64 product on one AMD EPYC
core), and numpy's calls carry less per-call overhead. The choice is measured, once per
process and `(dtype, d)`: a few interleaved rounds of one stage's two calls in each library,
the faster by its best round. The measurement only decides speed: both paths compute the
same step to rounding.
"""

from __future__ import annotations

import time
from functools import cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["NUMPY_DTYPES", "TIMED_MAX_DIM", "faster_backend", "numpy_stages"]

#: the dtypes whose single-line stages may run on numpy
NUMPY_DTYPES = (torch.float32, torch.float64)
#: interleaved timing rounds per library; each round lasts about `_ROUND_FLOPS` flops
_ROUNDS = 3
_ROUND_FLOPS = 4e6
#: larger sizes take the choice timed at this size (a one-time cost of about 50 ms)
TIMED_MAX_DIM = 512


@cache
def faster_backend(dtype: torch.dtype, d: int) -> str:
    """`"numpy"` or `"torch"`: the library whose stage (a combination of 12 stages and a
    `d × d` product, one thread setting as configured) was faster in a short timing; cached
    per `(dtype, d)`."""
    gen = torch.Generator().manual_seed(0)
    F = torch.randn(d, d, dtype=dtype, generator=gen) / max(d, 1) ** 0.5
    K = torch.randn(13, d * d, dtype=dtype, generator=gen)
    row = torch.randn(1, 13, dtype=dtype, generator=gen)  # (numpy: the 1 of `Y` first)
    Ys, out = torch.empty(1, d * d, dtype=dtype), torch.empty(d, d, dtype=dtype)
    Fn, Kn, rown, Ysn, outn = F.numpy(), K.numpy(), row.numpy()[0], Ys.numpy()[0], out.numpy()
    Ysm, Ysnm = Ys.view(d, d), Ysn.reshape(d, d)

    def with_torch() -> None:
        torch.addmm(K[0:1], row[:, 1:], K[1:13], alpha=0.5, out=Ys)
        torch.mm(F, Ysm, out=out)

    def with_numpy() -> None:
        np.dot(rown, Kn, out=Ysn)
        np.dot(Fn, Ysnm, out=outn)

    reps = max(1, min(50, round(_ROUND_FLOPS / (2 * d**3 + 26 * d * d))))
    best = {"torch": float("inf"), "numpy": float("inf")}
    with torch.no_grad():
        for fn in (with_torch, with_numpy):  # warm-up (first-call setup, page faults)
            fn()
        for _ in range(_ROUNDS):
            for name, fn in (("torch", with_torch), ("numpy", with_numpy)):
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return "numpy" if best["numpy"] < best["torch"] else "torch"


def numpy_stages(K0: Tensor) -> bool:
    """Whether the stages of the lines starting from `K0` `(B, ..., d, d)` run on numpy:
    one `d × d` line (batches keep torch's batched kernels), on the CPU, in float32 or
    float64, and numpy measured faster for its size (`faster_backend`; sizes above
    `TIMED_MAX_DIM` take the choice timed there)."""
    d = K0.shape[-1]
    return (
        K0.device.type == "cpu"
        and K0.dtype in NUMPY_DTYPES
        and d > 0
        and K0.numel() == d * d
        and faster_backend(K0.dtype, min(d, TIMED_MAX_DIM)) == "numpy"
    )
