"""The stages of one Runge-Kutta step of the batched Wilson-line propagator (`rk_lines`).

A linear equation `Y' = w Y` needs, per stage `i`, one combination `Y_i = Y + h Σ_j a_ij K_j`
and one product `K_i = w(t + c_i h) Y_i`. `BufferedStage` (no autograd) keeps the stages,
the stage input and the lines in buffers made once for all steps and writes every
combination and product in place (fresh whole-batch tensors would cost an allocation and
cold memory per stage); with a single `d × d` line the products are plain `mm` calls, which
skip the batched kernel's dispatch. `TrackedStage` builds the same step from new tensors so
that autograd can differentiate through it.
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
        eye = torch.eye(d, dtype=dtype, device=device)
        self.Y = eye.expand(self.shape).reshape(1, flat).clone()
        self.Ys = torch.empty(1, flat, dtype=dtype, device=device)
        self.Ynew = torch.empty(1, flat, dtype=dtype, device=device)
        self.E = torch.empty(2, flat, dtype=dtype, device=device)
        self._single = self.mats == 1
        self._mat = (d, d) if self._single else self.shape
        self._Km = [k.view(self._mat) for k in self.K]
        self._Ysm = self.Ys.view(self._mat)
        self._mul = torch.mm if self._single else torch.matmul

    def stages(self, F: Sequence[Tensor], a: float) -> None:
        """All stages of a step of length `a` (in the field's time) from the field values
        `F[i]` at the stage times; the new line goes to `Ynew`, the last stage (the field
        at the step's end times the new line) to `K[-1]`."""
        K, Y, rows, Km, mul = self.K, self.Y, self.rows, self._Km, self._mul
        n, mat = len(rows), self._mat
        for i in range(n - 1):
            torch.addmm(Y, rows[i], K[: i + 1], alpha=a, out=self.Ys)
            mul(F[i].reshape(mat) if self._single else F[i], self._Ysm, out=Km[i + 1])
        torch.addmm(Y, rows[-1], K[:n], alpha=a, out=self.Ynew)
        Fn = F[n - 1].reshape(mat) if self._single else F[n - 1]
        mul(Fn, self.Ynew.view(mat), out=Km[n])

    def error_terms(self, errors: Tensor) -> Tensor:
        """`(3, lines)`: the largest entries of the two error combinations `errors @ K`
        (`(2, stages)` weights) and of the new line, per `d × d` line."""
        torch.mm(errors, self.K, out=self.E)
        lines = max(self.mats, 1)
        err = self.E.view(2, lines, -1).abs().amax(2)
        size = self.Ynew.view(lines, -1).abs().amax(1)
        return torch.cat([err, size[None]])

    def accept(self) -> None:
        """Take the step: the new line becomes the line (buffers swap), the last stage the
        next step's first."""
        self.Y, self.Ynew = self.Ynew, self.Y
        self.K[0].copy_(self.K[-1])

    def line(self) -> Tensor:
        return self.Y.view(self.shape)


class TrackedStage:
    """The stages of one step as new tensors, differentiable by autograd (see
    `BufferedStage` for the arguments)."""

    def __init__(self, K0: Tensor, rows: Sequence[Tensor]):
        self.shape, self.rows = K0.shape, rows
        flat, d = K0.numel(), K0.shape[-1]
        eye = torch.eye(d, dtype=K0.dtype, device=K0.device)
        self.Y = eye.expand(self.shape).reshape(1, flat)
        self.K0, self.K, self.Ynew = K0, [], self.Y

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
