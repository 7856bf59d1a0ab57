"""The stages of an RK8 step of a single `d × d` line in numpy buffers, on numpy's BLAS.

Used by `rk_lines` in place of `BufferedStage` for one line on the CPU without autograd, when
numpy's BLAS was measured faster for the size (`_rk_backend`). The arithmetic is the same
step: every stage is one `gemv`, the stage input `Y + a Σ_j a_ij K_j` as a row of weights
times the stacked line and stages, and one product `K_i = w(t_i) Y_i`.

The line and the stages are rows of one buffer `S`, stored so that the weights a row needs
are contiguous: Dormand and Prince's `K_1` and `K_2` are used only by the next two or three
stages and are stored before `Y` and `K_0`, `K_3` and `K_4` are not used by the weights `b`
nor by the error combinations, so each combination reads a slice of `S` holding few zero
weights; the last combination computes the two error combinations beside the new line
(their weight on the last stage is 0), so a step reads 74 rows of `S` where whole prefixes
and a separate error combination would read 103.
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
    if x.requires_grad or x.is_neg():
        x = x.detach().resolve_neg()
    return x.numpy()


@dataclass(frozen=True)
class _Plan:
    """`weights` `(n, slots)`: the rows of the tableau (`b` last) in the storage order of `S`,
    with the line's 1; `spans[i]`: the slots row `i` reads; `outs[i]`: where stage `i + 1`
    is written; `y`, `k0`: the slots of the line and of the first stage; `errors` `(2,
    slots)`: the weights of the two error combinations, which the last combination (the new
    line, over `spans[-1]`, widened to hold them) computes beside the line."""

    weights: np.ndarray
    spans: tuple[tuple[int, int], ...]
    outs: tuple[int, ...]
    y: int
    k0: int
    errors: np.ndarray


def _span(rows: np.ndarray) -> tuple[int, int]:
    nonzero = np.flatnonzero(np.any(np.atleast_2d(rows) != 0, axis=0))
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
        weights[i, slot[0]] = 1.0
        for j, value in enumerate(as_numpy(row.cpu()).reshape(-1)):
            weights[i, slot[1 + j]] = value
    err = np.zeros((2, n + 2), dtype=dtype)
    for j, column in enumerate(as_numpy(errors.cpu()).T):
        err[:, slot[1 + j]] = column
    spans = [_span(weights[i]) for i in range(n - 1)]
    spans.append(_span(np.concatenate([weights[-1:], err])))
    outs = tuple(slot[2 + i] for i in range(n))
    # A row reads only slots written before it in the step (or the line, `K_0`): a stale
    # slot of a rejected step, even with weight 0, could hold a non-finite value. (The
    # error weights of the last stage, which the new line's combination cannot see, are 0.)
    for i, (lo, hi) in enumerate(spans):
        assert set(range(lo, hi)) <= {slot[0], slot[1], *outs[:i]}, (i, lo, hi)
    for array in (weights, err):
        array.flags.writeable = False
    return _Plan(weights, tuple(spans), outs, slot[0], slot[1], err)


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
        self.S[plan.y] = 0.0
        self.S[plan.y, :: d + 1] = 1.0  # (the identity, written in place)
        self.S[plan.k0] = K0n.reshape(-1)
        # The two error combinations and the new line: one combination, one reduction.
        self._now, self._abs = block[slots : slots + 3], block[slots + 3 : slots + 6]
        self._Ys = block[slots + 6]
        self._Ysm = self._Ys.reshape(d, d)
        self._Sm = list(self.S.reshape(slots, d, d))
        lo, hi = plan.spans[-1]
        self._last = np.concatenate([plan.errors[:, lo:hi], plan.weights[-1:, lo:hi]])
        self._first: np.ndarray | None = None  # the factor of a first stage still to take
        self._end: tuple[Sequence[Tensor | np.ndarray], int] = ((), 0)

    def unbind(self, F: Tensor) -> Sequence[np.ndarray]:
        """The field values at the stage times `(stages, 1, d, d)` as one `(stages, d, d)`
        array, whose rows are the `d × d` factors (a view when `F` is contiguous)."""
        d = self.shape[-1]
        return np.ascontiguousarray(as_numpy(F)).reshape(-1, d, d)

    def stages(self, F: Sequence[Tensor | np.ndarray], a: float) -> None:
        """All stages of a step of length `a` (see `BufferedStage.stages`) but the last,
        `w(t + a) Y_new`, which is only the next step's first: `accept` keeps its factor and
        the next step computes it (no product for a rejected step, nor for the last one)."""
        plan, S, Sm, weights = self._plan, self.S, self._Sm, self._weights
        np.multiply(plan.weights, a, out=weights)
        weights[:, plan.y] = 1.0  # (the line's weight, scaled with the rest above)
        n, (first, end) = len(weights), plan.spans[-1]
        self._last[2] = weights[-1, first:end]  # (error weights not scaled: `rk_lines`)
        # (A non-finite stage is reported by `rk_lines` from the error terms, as a GaugeError.)
        with np.errstate(all="ignore"):
            if self._first is not None:  # the first stage, `w(t) Y`, of an accepted step
                np.dot(self._first, self._Sm[plan.y], out=self._Sm[plan.k0])
                self._first = None
            for i, ((lo, hi), k) in enumerate(zip(plan.spans[:-1], plan.outs)):
                np.dot(weights[i, lo:hi], S[lo:hi], out=self._Ys)
                np.dot(self._factor(F[i]), self._Ysm, out=Sm[k])
            # The errors and the new line, `(3, d²)`, in one product.
            np.dot(self._last, S[first:end], out=self._now)
        self._end = F, n - 1  # (taken on acceptance: a lazy field is not evaluated before)

    def _factor(self, Fi: Tensor | np.ndarray) -> np.ndarray:
        if isinstance(Fi, Tensor):  # (a factor computed on access, `_Lazy`)
            d = self.shape[-1]
            return np.ascontiguousarray(as_numpy(Fi)).reshape(d, d)
        return Fi

    def error_terms(self, errors: Tensor) -> np.ndarray:
        """`(3, 1)`: the largest entries of the two error combinations and of the new line
        (`errors`: the tableau's, already combined by `stages`; an array, which
        `_largest_error` reads as it reads a tensor)."""
        return np.abs(self._now, out=self._abs).max(axis=1, keepdims=True)

    def accept(self) -> None:
        """Take the step: the new line becomes the line; the field at the step's end is kept
        for the next step's first stage."""
        self.S[self._plan.y] = self._now[2]
        F, last = self._end
        self._first = self._factor(F[last])

    def line(self) -> Tensor:
        return torch.from_numpy(self.S[self._plan.y].copy()).reshape(self.shape)
