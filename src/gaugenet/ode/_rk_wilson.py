"""Wilson lines by the batched RK8 propagator: chunks of intervals, and pieces of long ones.

Large batches are taken in chunks whose stages fit in cache (about 27 `d × d` tensors per
line): one pass over a large batch would stream every stage through memory. Below
`PIECES_MAX_DIM` a few long intervals are each cut into pieces integrated side by side, which
trades a few more products for fewer sequential kernels where a kernel's dispatch costs more
than its arithmetic; from that size on the products dominate and each interval is integrated
in one sequence of steps (pieces would take more steps in all: each starts with its own
first step, to a tolerance divided among them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._errors import GaugeError
from ._products import ordered_product
from ._rk import rk_lines

__all__ = ["PIECES_MAX_DIM", "RK_CHUNK_BYTES", "rk_pieces", "rk_wilson"]

MatrixField = Callable[[Tensor], Tensor]

#: RK8 takes the intervals in chunks of about this many bytes of stages
RK_CHUNK_BYTES = 2**25
#: long intervals are cut into pieces integrated side by side only below this dimension
PIECES_MAX_DIM = 64


def rk_pieces(A0: Tensor, lengths: Tensor, rtol: float, room: int) -> int:
    """Pieces per interval for RK8: about a third of the steps RK8's first step predicts
    (error `~ (h ν)^9` at `rtol`, `ν` the field's largest entry times the interval's
    length), at most 8 and at most `room` (the chunk's intervals per line); one from
    `d = PIECES_MAX_DIM` on."""
    if A0.shape[-1] >= PIECES_MAX_DIM:
        return 1
    with torch.no_grad():
        size = A0.detach().abs().flatten(1).amax(1) * lengths.abs()
        nu = float(size.max()) if size.numel() else 0.0
    if not math.isfinite(nu) or nu == 0.0:
        return 1
    steps = nu / (0.5 * rtol ** (1.0 / 9.0))
    return max(1, min(8, room, round(steps / 3)))


def rk_wilson(
    w: MatrixField,
    t1: Tensor,
    t0: Tensor,
    A0: Tensor,
    rtol: float | None,
    steps: int | None,
    max_steps: int,
) -> tuple[Tensor, float]:
    """The lines over the flat intervals `t0 -> t1` (shape `(B,)`) by RK8, to `rtol`, or
    with `steps` equal steps when `rtol` is `None`; `A0 = w(t0)`. Returns the lines
    `(B, ..., d, d)` and the error estimate (summed accepted local errors)."""
    B, d, itemsize = t0.shape[0], A0.shape[-1], A0.element_size()
    per_line = math.prod(A0.shape[1:-2])

    def budget(taken: int, sigma: float) -> None:
        if taken >= max_steps:
            raise GaugeError(
                f"wilson_line: the step budget max_steps={max_steps} is spent at "
                f"{sigma:.3g} of the interval (RK8, "
                + (f"rtol={rtol:.1e})" if rtol is not None else f"steps={steps})")
            )

    chunk = max(1, RK_CHUNK_BYTES // (27 * per_line * d * d * itemsize))
    pieces = 1 if rtol is None or d >= PIECES_MAX_DIM else rk_pieces(A0, t1 - t0, rtol, chunk // B)
    if pieces > 1:
        # Tolerance per piece rtol / pieces: the same local tolerance per unit time.
        k = torch.arange(pieces + 1, dtype=t0.dtype, device=t0.device) / pieces
        cuts = t0[:, None] + k[None, :] * (t1 - t0)[:, None]
        a, b = cuts[:, :-1].reshape(-1), cuts[:, 1:].reshape(-1)
        Wp, err = rk_lines(w, b, a, rtol / pieces, budget)
        Wp = Wp.reshape(B, pieces, *Wp.shape[1:]).movedim(1, -3)
        return ordered_product(Wp), err * pieces
    if chunk >= B:
        return rk_lines(w, t1, t0, rtol or 1.0, budget, steps, A0)
    parts = [
        rk_lines(
            w, t1[i : i + chunk], t0[i : i + chunk], rtol or 1.0, budget, steps, A0[i : i + chunk]
        )
        for i in range(0, B, chunk)
    ]
    W = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
    return W, max(p[1] for p in parts)
