"""The stages of one Runge-Kutta step of the batched Wilson-line propagator (`rk_lines`).

A linear equation `Y' = w Y` needs, per stage `i`, one combination `Y_i = Y + h Σ_j a_ij K_j`
and one product `K_i = w(t + c_i h) Y_i`. `BufferedStage` (no autograd) keeps the stages,
the stage input and the lines in buffers made once for all steps and writes every
combination and product in place (fresh whole-batch tensors would cost an allocation and
cold memory per stage); with a single `d × d` line the products are plain `mm` calls, which
skip the batched kernel's dispatch. `NumpyStage` (`_rk_numpy`) is the same for a single line
on the CPU with numpy's BLAS, where that is measured faster (`_rk_backend`). `TrackedStage`
builds the same step from new tensors so that autograd can differentiate through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BufferedStage", "TrackedStage"]


class BufferedStage:
    """The stages of one step in preallocated buffers (no autograd).

    `K0` `(B, ..., d, d)` is the first stage of the first step (the field at the start);
    `rows` the tableau's rows, the weights `b` last, each a `(1, i)` matrix."""

    def __init__(self, K0: Tensor, rows: Sequence[Tensor]):
        self.shape, flat, d = K0.shape, K0.numel(), K0.shape[-1]
        self.mats, self.rows = flat // (d * d) if d else 0, rows
        dtype, device = K0.dtype, K0.device
        self.K = torch.empty(len(rows) + 1, flat, dtype=dtype, device=device)
        self.K[0].copy_(K0.reshape(flat))
        self.Ys = torch.empty(1, flat, dtype=dtype, device=device)
        # Two `(3, flat)` buffers: the two error combinations and, in the last row, a line
        # (the new one in `_now`, the current one in `_then`), so that one reduction gives
        # every error term of a step. Taking the step swaps them.
        self._now = torch.empty(3, flat, dtype=dtype, device=device)
        self._then = torch.empty(3, flat, dtype=dtype, device=device)
        eye = torch.eye(d, dtype=dtype, device=device)
        self._then[2].copy_(eye.expand(self.shape).reshape(flat))
        self.Y, self.Ynew = self._then[2:], self._now[2:]
        self._single = self.mats == 1
        self._mat = (d, d) if self._single else self.shape
        # Views made once: every stage is then two kernels (a combination, a product).
        self._Km = self.K.view(len(rows) + 1, *self._mat).unbind(0)
        self._Kpre = [self.K[: i + 1] for i in range(len(rows))]
        self._Ysm = self.Ys.view(self._mat)
        self._mul = torch.mm if self._single else torch.matmul

    def unbind(self, F: Tensor) -> Sequence[Tensor]:
        """The field values at the stage times, `(stages · B, ..., d, d)`, as one factor per
        stage in the shape the products take."""
        return F.reshape(-1, *self._mat).unbind(0)

    def stages(self, F: Sequence[Tensor], a: float) -> None:
        """All stages of a step of length `a` (in the field's time) from the field values
        `F[i]` at the stage times; the new line goes to `Ynew`, the last stage (the field
        at the step's end times the new line) to `K[-1]`."""
        Y, rows, Kpre, Km, mul = self.Y, self.rows, self._Kpre, self._Km, self._mul
        n, mat = len(rows), self._mat
        for i in range(n):
            out, out_m = (self.Ys, self._Ysm) if i + 1 < n else (self.Ynew, None)
            torch.addmm(Y, rows[i], Kpre[i], alpha=a, out=out)
            Fi = F[i]
            if Fi.dim() != len(mat):  # (a factor computed on access, `_Lazy`)
                Fi = Fi.reshape(mat)
            mul(Fi, out.view(mat) if out_m is None else out_m, out=Km[i + 1])

    def error_terms(self, errors: Tensor) -> Tensor:
        """`(3, lines)`: the largest entries of the two error combinations `errors @ K`
        (`(2, stages)` weights) and of the new line, per `d × d` line."""
        torch.mm(errors, self.K, out=self._now[:2])
        return self._now.view(3, max(self.mats, 1), -1).abs().amax(2)

    def accept(self) -> None:
        """Take the step: the new line becomes the line (buffers swap), the last stage the
        next step's first."""
        self._now, self._then = self._then, self._now
        self.Y, self.Ynew = self._then[2:], self._now[2:]
        self.K[0].copy_(self.K[-1])

    def line(self) -> Tensor:
        return self.Y.reshape(self.shape).clone()  # (not a view that keeps the buffers)


class TrackedStage:
    """The stages of one step as new tensors, differentiable by autograd (see
    `BufferedStage` for the arguments)."""

    def __init__(self, K0: Tensor, rows: Sequence[Tensor]):
        self.shape, self.rows = K0.shape, rows
        flat, d = K0.numel(), K0.shape[-1]
        eye = torch.eye(d, dtype=K0.dtype, device=K0.device)
        self.Y = eye.expand(self.shape).reshape(1, flat)
        self.K0, self.K, self.Ynew = K0, [], self.Y

    def unbind(self, F: Tensor) -> Sequence[Tensor]:
        return F.reshape(-1, *self.shape).unbind(0)

    def stages(self, F: Sequence[Tensor], a: float) -> None:
        flat = self.Y.shape[-1]
        K = [self.K0.reshape(flat)]
        for i, row in enumerate(self.rows):
            Ys = torch.addmm(self.Y, row, torch.stack(K), alpha=a)
            K.append((F[i] @ Ys.reshape(self.shape)).reshape(flat))
        self.K, self.Ynew = K, Ys

    def error_terms(self, errors: Tensor) -> Tensor:
        lines = max(self.Y.numel() // self.shape[-1] ** 2, 1) if self.shape[-1] else 1
        err = (errors @ torch.stack(self.K).detach()).view(2, lines, -1).abs().amax(2)
        size = self.Ynew.detach().reshape(lines, -1).abs().amax(1)
        return torch.cat([err, size[None]])

    def accept(self) -> None:
        self.Y, self.K0 = self.Ynew, self.K[-1].reshape(self.shape)

    def line(self) -> Tensor:
        return self.Y.reshape(self.shape)
