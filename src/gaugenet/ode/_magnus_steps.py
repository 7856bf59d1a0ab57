"""Fixed-step Magnus lines over a batch of intervals, in cache-sized chunks.

The intervals are taken in chunks; every step of a chunk is exponentiated in one batched call
(`expm`) and the ordered product is taken as a balanced tree, so the work is a handful of
batched kernels per chunk. Lines that come out non-finite are diagnosed here: a field that is
not finite where it was evaluated, or steps too long for a finite field (`Overflow`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .._errors import GaugeError
from ._expm import expm
from ._magnus import MagnusMethod
from ._magnus_numpy import numpy_small, numpy_steps, numpy_steps_product
from ._products import ordered_product
from ._rk_numpy import as_numpy
from ._wilson_checks import check_field, nonfinite_field

__all__ = [
    "MAGNUS_CHUNK_BYTES",
    "NUMPY_TIMES",
    "Overflow",
    "check_finite",
    "chunk_size",
    "doubling_pair",
    "fixed_steps",
    "node_times",
    "node_values",
    "not_finite",
]

MatrixField = Callable[[Tensor], Tensor]


class Overflow(Exception):
    """A batched call's lines are not finite although the field is: the steps are too long
    for the field (or the line itself overflows)."""


#: Magnus steps are taken in chunks of whole intervals whose step matrices fill about this
#: many bytes: the temporaries of a chunk stay in cache and are reused by the allocator, where
#: whole-batch temporaries would stream through memory and fault in fresh pages every call
MAGNUS_CHUNK_BYTES = 2**20


def fixed_steps(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    n: int,
    method: MagnusMethod,
    exp_tol: float | None = None,
    line_bytes: int = 0,
) -> Tensor:
    """Wilson lines over the flat intervals `t0 -> t1` (shape `(B,)`) with `n` equal steps;
    `exp_tol` bounds each step exponential's Taylor remainder (default: roundoff). The
    lines are not checked for finiteness here (callers do, on reductions they need anyway).

    With `line_bytes` (the bytes of `w` at one time), the intervals are taken in chunks
    whose node values fill about `MAGNUS_CHUNK_BYTES`; within a chunk the field is evaluated
    in one call and all steps are one batched call."""
    size = chunk_size(t0.shape[0], n * len(method.nodes) * line_bytes)
    if size >= t0.shape[0]:  # one chunk (no slices to take)
        return steps_product(node_values(w, t1, t0, n, method), (t1 - t0) / n, method, exp_tol)
    parts = [
        steps_product(
            node_values(w, t1[i : i + size], t0[i : i + size], n, method),
            (t1[i : i + size] - t0[i : i + size]) / n,
            method,
            exp_tol,
        )
        for i in range(0, max(t0.shape[0], 1), size)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def chunk_size(B: int, per: int) -> int:
    """Intervals per chunk, `per` bytes of node values each (all of them when `per = 0`)."""
    return max(1, MAGNUS_CHUNK_BYTES // per) if per > 0 else max(B, 1)


def node_values(w: MatrixField, t1: Tensor, t0: Tensor, n: int, method: MagnusMethod) -> Tensor:
    """The field at the nodes of `n` steps per interval: `(B, n, s, ..., d, d)`."""
    times = node_times(t1, t0, n, method)
    A = w(times)
    check_field(A, times.shape[0])
    return A.reshape(t0.shape[0], n, len(method.nodes), *A.shape[1:])


def steps_product(A: Tensor, h: Tensor, method: MagnusMethod, exp_tol: float | None) -> Tensor:
    """The ordered product of the step exponentials from node values `A` `(B, n, s, ..., d,
    d)` and step lengths `h` `(B,)`: all steps of the chunk in one batched call (a single
    small line without a graph: in numpy, `_magnus_numpy`)."""
    if numpy_steps(A, h, method):
        return numpy_steps_product(A, h, method, exp_tol)
    extra = A.dim() - 5
    A = A.movedim(2, -3)
    hb = h.reshape(h.shape[0], 1, *([1] * extra), 1, 1)
    omega = method.omega(A, hb)
    steps = expm(omega, exp_tol)  # (B, n, *extra, d, d): all steps in one call
    steps = steps.movedim(1, -3)  # step axis next to the matrix axes
    return ordered_product(steps)


#: node times are computed in numpy (no kernels) up to this many, on the CPU without autograd
NUMPY_TIMES = 4096


def _numpy_times(t1: Tensor, t0: Tensor, count: int) -> bool:
    """Whether `count` times from `t1`, `t0` are computed in numpy: few, on the CPU, in
    float32 or float64, without a graph to the end points."""
    return (
        count <= NUMPY_TIMES
        and t0.device.type == "cpu"
        and t0.dtype in (torch.float32, torch.float64)
        and not (t0.requires_grad or t1.requires_grad)
    )


def node_times(t1: Tensor, t0: Tensor, n: int, method: MagnusMethod) -> Tensor:
    """The `B · n · s` times at which `fixed_steps` evaluates `w`, flat.

    Few times on the CPU (no graph to the end points) are computed in numpy by the same
    elementwise operations in the same dtype, so the times are the same to the bit; a
    handful of torch kernels would cost more than a small step's arithmetic."""
    if _numpy_times(t1, t0, t0.shape[0] * n * len(method.nodes)):
        a, b = as_numpy(t0), as_numpy(t1)
        dtype = a.dtype
        hn = (b - a) / dtype.type(n)
        k = np.arange(n, dtype=dtype)
        c = np.array(method.nodes, dtype=dtype)
        times = a[:, None, None] + (k[None, :, None] + c[None, None, :]) * hn[:, None, None]
        return torch.from_numpy(times.reshape(-1))
    h = (t1 - t0) / n
    k = torch.arange(n, dtype=t0.dtype, device=t0.device)
    c = torch.tensor(method.nodes, dtype=t0.dtype, device=t0.device)
    times = t0[:, None, None] + (k[None, :, None] + c[None, None, :]) * h[:, None, None]
    return times.reshape(-1)


def not_finite(w: MatrixField, t1: Tensor, t0: Tensor, n: int, method: MagnusMethod) -> Exception:
    """Why lines with `n` steps came out non-finite: `GaugeError` naming the times where `w`
    is not finite, else `Overflow` (the field is finite; the steps are too long or the line
    overflows)."""
    times = node_times(t1, t0, n, method)
    with torch.no_grad():
        error = nonfinite_field(w(times), times)
    return error if error is not None else Overflow()


def check_finite(
    value: float, w: MatrixField, t1: Tensor, t0: Tensor, n: int, method: MagnusMethod
) -> None:
    """Raise `GaugeError` when `value` (a reduction over lines with `n` steps) is not finite."""
    if math.isfinite(value):
        return
    why = not_finite(w, t1, t0, n, method)
    if isinstance(why, GaugeError):
        raise why
    raise GaugeError(
        f"wilson_line: the line is not finite with {n} steps although w(t) is: the steps are "
        "too long for the field, or the line overflows (use rtol or more steps)"
    )


def doubling_pair(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    n: int,
    method: MagnusMethod,
    exp_tol: float | None,
    line_bytes: int = 0,
) -> tuple[Tensor, Tensor]:
    """The lines over `t0 -> t1` with `n` and with `2 n` steps, in one batched call: the
    `2 n`-step line is the product of the `n`-step lines over the two halves."""
    B = t0.shape[0]
    if _numpy_times(t1, t0, 3 * B):  # (the same operations in numpy: no kernels)
        a, b = as_numpy(t0), as_numpy(t1)
        mid = 0.5 * (a + b)
        ends = torch.from_numpy(np.concatenate([b, mid, b]))
        starts = torch.from_numpy(np.concatenate([a, a, mid]))
    else:
        mid = 0.5 * (t0 + t1)
        ends, starts = torch.cat([t1, mid, t1]), torch.cat([t0, t0, mid])
    W = fixed_steps(w, ends, starts, n, method, exp_tol, line_bytes)
    if numpy_small(W):  # (one small line: numpy's product, no kernel)
        Wn = as_numpy(W)
        return W[:B], torch.from_numpy(Wn[2 * B :] @ Wn[B : 2 * B])
    return W[:B], W[2 * B :] @ W[B : 2 * B]
