"""Jacobian products by plain autograd, for models that `torch.func` cannot transform.

An `autograd.Function` without `setup_context` (BLOOM's GELU) runs under plain autograd but
not under `torch.func.jvp`/`vjp`. For such a model the certifier's products are taken from
one recorded graph instead:

- `J^T u`: a backward pass through the recorded outputs (graph kept);
- `J v`: the derivative, with respect to `u`, of `(J^T u) · v`, which is linear in `u`: a
  second backward pass through the first one (the "double backward" trick). It needs the
  model's backward to be differentiable, as every backward written with torch operations is.

Both are checked against each other once, by the adjoint identity `uᵀ(J v) = (Jᵀu)ᵀ v` for
random `u, v`: a backward marked `once_differentiable` drops its part of `J v` silently, and
that is a `GaugeError`, not a wrong product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from .._errors import GaugeError
from .._func import untransformable
from ._jacobian import FlatModel, measuring

__all__ = ["AutogradProducts", "or_autograd"]

Operator = Callable[[Tensor], Tensor]
X = TypeVar("X")

_UNDIFFERENTIABLE = (
    "the model cannot be differentiated here: torch.func cannot transform it and its "
    "backward is not differentiable (a custom autograd.Function without setup_context)"
)


class AutogradProducts:
    """`J v` and `J^T u` of `fm.f` at `fm.theta`, `(n_params,)` ↔ `(n_outputs,)`, by plain
    autograd on one recorded graph (built on first use)."""

    def __init__(self, fm: FlatModel) -> None:
        self._fm = fm
        self._graph: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _record(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._graph is None:
            theta = self._fm.theta.detach().requires_grad_(True)
            with torch.enable_grad(), measuring():
                out = self._fm.f(theta)
                u = torch.zeros_like(out, requires_grad=True)
                (g,) = torch.autograd.grad(out, theta, u, create_graph=True, allow_unused=True)
            if g is None:  # no parameter reaches the outputs
                g = torch.zeros_like(theta)
            self._graph = (theta, out, u, g)
            self._check_adjoint()
        return self._graph

    def _check_adjoint(self) -> None:
        gen = torch.Generator().manual_seed(0)
        theta, out = self._graph[0], self._graph[1]
        v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
        u = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        jv, jtu = self.jvp(v), self.vjp(u)
        left, right = float(u @ jv), float(jtu @ v)
        scale = float(u.norm() * jv.norm() + jtu.norm() * v.norm())
        if not abs(left - right) <= 1e-10 * max(scale, 1e-300):
            raise GaugeError(
                f"{_UNDIFFERENTIABLE} (its backward once_differentiable?): the products J v "
                f"and Jᵀ u disagree (uᵀ(J v) = {left:.6e}, (Jᵀ u)ᵀ v = {right:.6e})"
            )

    def vjp(self, u: Tensor) -> Tensor:
        """`J^T u`, `u` `(n_outputs,)` → `(n_params,)`."""
        theta, out, _, _ = self._record()
        (g,) = torch.autograd.grad(out, theta, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(theta) if g is None else g.detach()

    def jvp(self, v: Tensor) -> Tensor:
        """`J v`, `v` `(n_params,)` → `(n_outputs,)`."""
        _, out, u, g = self._record()
        if not g.requires_grad:  # the outputs do not depend on the parameters
            return torch.zeros_like(out).detach()
        try:
            (jv,) = torch.autograd.grad(g, u, v, retain_graph=True, allow_unused=True)
        except RuntimeError as exc:
            raise GaugeError(
                f"{_UNDIFFERENTIABLE} (its backward not written with torch ops?): {exc}"
            ) from exc
        return torch.zeros_like(out).detach() if jv is None else jv.detach()


def or_autograd(
    first: Callable[[X], Tensor], second: Callable[[], Callable[[X], Tensor]]
) -> Callable[[X], Tensor]:
    """`first`, or `second()` from the first call on which `first` raises because
    `torch.func` cannot transform the model (`untransformable`); every other error is
    raised as it is."""
    chosen: list[Callable[[X], Tensor]] = []

    def op(x: X) -> Tensor:
        if chosen:
            return chosen[0](x)
        try:
            return first(x)
        except RuntimeError as exc:
            if not untransformable(exc):
                raise
            chosen.append(second())
            return chosen[0](x)

    return op
