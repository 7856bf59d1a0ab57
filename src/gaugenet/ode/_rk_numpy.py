"""The stages of an RK8 step of a single `d × d` line in numpy buffers, on numpy's BLAS.

Used by `rk_lines` in place of `BufferedStage` for one line on the CPU without autograd, when
numpy's BLAS was measured faster for the size (`_rk_backend`). The arithmetic is the same
step: every stage is one `gemv`, the stage input `Y + a Σ_j a_ij K_j` as a row of weights
times the stacked line and stages, and one product `K_i = w(t_i) Y_i`.

The line and the stages are rows of one buffer `S`, stored so that the weights a row needs
are contiguous: Dormand and Prince's `K_1` and `K_2` are used only by the next two or three
stages and are stored before `Y` and `K_0`, `K_3` and `K_4` are not used by the weights `b`
nor by the error combinations, so each combination reads a slice of `S` holding few zero
weights (84 rows of `S` read per step where whole prefixes would read 103).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["NumpyStage", "as_numpy"]

#: storage order of `S` by column of the tableau (0: the line `Y`, `1 + j`: the stage `K_j`)
_ORDER = (3, 2, 0, 1, *range(4, 14))


def as_numpy(x: Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory (a copy for lazy negated views)."""
    return x.detach().resolve_neg().numpy()


@dataclass(frozen=True)
class _Plan:
    """`weights` `(n, slots)`: the rows of the tableau (`b` last) in the storage order of `S`,
    with the line's 1; `spans[i]`: the slots row `i` reads; `outs[i]`: where stage `i + 1`
    is written; `y`, `k0`: the slots of the line and of the first stage; `errors` the error
    weights `(2, hi - lo)` over `S[lo:hi]`, `(lo, hi) = error_span`."""

    weights: np.ndarray
    spans: tuple[tuple[int, int], ...]
    outs: tuple[int, ...]
    y: int
    k0: int
    errors: np.ndarray
    error_span: tuple[int, int]


def _span(row: np.ndarray) -> tuple[int, int]:
    nonzero = np.flatnonzero(row)
    return int(nonzero[0]), int(nonzero[-1]) + 1


@cache
def _plan(rows: tuple[Tensor, ...], errors: Tensor, dtype: np.dtype) -> _Plan:
    """The plan of `NumpyStage` for the cached tableau's `rows` (`(1, i)` each) and error
    weights `(2, stages)`."""
    n = len(rows)
    assert len(_ORDER) == n + 2, "the storage order is Dormand-Prince 8's"
    slot = {column: k for k, column in enumerate(_ORDER)}
    weights = np.zeros((n, n + 2), dtype=dtype)
    for i, row in enumerate(rows):
        values = as_numpy(row.cpu()).reshape(-1)
        weights[i, slot[0]] = 1.0
        for j, value in enumerate(values):
            weights[i, slot[1 + j]] = value
    spans = tuple(_span(weights[i]) for i in range(n))
    outs = tuple(slot[2 + i] for i in range(n))
    # A row reads only slots written before it in the step (or the line, `K_0`): a stale
    # slot of a rejected step, even with weight 0, could hold a non-finite value.
    for i, (lo, hi) in enumerate(spans):
        assert set(range(lo, hi)) <= {slot[0], slot[1], *outs[:i]}, (i, lo, hi)
    err = np.zeros((2, n + 2), dtype=dtype)
    for j, column in enumerate(as_numpy(errors.cpu()).T):
        err[:, slot[1 + j]] = column
    lo, hi = min(_span(err[0])[0], _span(err[1])[0]), max(_span(err[0])[1], _span(err[1])[1])
    for array in (weights, err):
        array.flags.writeable = False
    return _Plan(
        weights, spans, outs, slot[0], slot[1], np.ascontiguousarray(err[:, lo:hi]), (lo, hi)
    )


class NumpyStage:
    """The stages of one step of one `d × d` line (see `BufferedStage` for the interface):
    `K0` `(1, d, d)`, `rows` and `errors` the tableau's (`rk_lines`)."""

    def __init__(self, K0: Tensor, rows: Sequence[Tensor], errors: Tensor):
        self.shape, d = K0.shape, K0.shape[-1]
        K0n = as_numpy(K0)
        plan = self._plan = _plan(tuple(rows), errors, K0n.dtype)
        slots = plan.weights.shape[1]
        self._weights = np.empty_like(plan.weights)
        block = np.empty((slots + 7, d * d), dtype=K0n.dtype)  # (one allocation for all)
        self.S = block[:slots]
        self.S[plan.y] = np.eye(d, dtype=K0n.dtype).reshape(-1)
        self.S[plan.k0] = K0n.reshape(-1)
        # The two error combinations and the new line, reduced together; their abs values.
        self._now, self._abs = block[slots : slots + 3], block[slots + 3 : slots + 6]
        self._Ys = block[slots + 6]
        self._Ysm, self._Ynewm = self._Ys.reshape(d, d), self._now[2].reshape(d, d)
        self._Sm = list(self.S.reshape(slots, d, d))

    def unbind(self, F: Tensor) -> Sequence[np.ndarray]:
        """The field values at the stage times `(stages, 1, d, d)` as `d × d` arrays (views
        when `F` is contiguous)."""
        d = self.shape[-1]
        return list(np.ascontiguousarray(as_numpy(F)).reshape(F.shape[0], d, d))

    def stages(self, F: Sequence[Tensor | np.ndarray], a: float) -> None:
        """All stages of a step of length `a` (see `BufferedStage.stages`)."""
        plan, S, Sm, weights = self._plan, self.S, self._Sm, self._weights
        np.multiply(plan.weights, a, out=weights)
        weights[:, plan.y] = 1.0  # (the line's weight, scaled with the rest above)
        n, d = len(weights), self.shape[-1]
        # (A non-finite stage is reported by `rk_lines` from the error terms, as a GaugeError.)
        with np.errstate(all="ignore"):
            for i, ((lo, hi), k) in enumerate(zip(plan.spans, plan.outs)):
                last = i + 1 == n
                out, out_m = (self._now[2], self._Ynewm) if last else (self._Ys, self._Ysm)
                np.dot(weights[i, lo:hi], S[lo:hi], out=out)
                Fi = F[i]
                if isinstance(Fi, Tensor):  # (a factor computed on access, `_Lazy`)
                    Fi = np.ascontiguousarray(as_numpy(Fi)).reshape(d, d)
                np.dot(Fi, out_m, out=Sm[k])

    def error_terms(self, errors: Tensor) -> Tensor:
        """`(3, 1)`: the largest entries of the two error combinations and of the new line
        (`errors`: the tableau's, as planned)."""
        lo, hi = self._plan.error_span
        with np.errstate(all="ignore"):
            np.dot(self._plan.errors, self.S[lo:hi], out=self._now[:2])
            size = np.abs(self._now, out=self._abs).max(axis=1, keepdims=True)
        return torch.from_numpy(size)

    def accept(self) -> None:
        """Take the step: the new line becomes the line, the last stage the next first."""
        self.S[self._plan.y] = self._now[2]
        self.S[self._plan.k0] = self.S[self._plan.outs[-1]]

    def line(self) -> Tensor:
        return torch.from_numpy(self.S[self._plan.y].copy()).reshape(self.shape)
