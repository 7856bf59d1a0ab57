"""Infinitesimal gauge transformations: the first-order deformations of eq. (16) and (20)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import jvp

from ._neural_ode import Field, as_field_module

__all__ = ["lie_derivative", "time_shift_derivative"]


class _LieDerivative(nn.Module):
    def __init__(self, field: Field, eps: Field) -> None:
        super().__init__()
        self.field = as_field_module(field)
        self.eps = as_field_module(eps)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        f, df_eps = jvp(lambda y: self.field(t, y), (x,), (self.eps(t, x),))
        e, de_f = jvp(lambda y: self.eps(t, y), (x,), (f,))
        _, de_dt = jvp(lambda s: self.eps(s, x), (t,), (torch.ones_like(t),))
        return df_eps - de_f - de_dt


class _TimeShiftDerivative(nn.Module):
    def __init__(self, field: Field, eps0: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.field = as_field_module(field)
        self.eps0 = as_field_module(eps0)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        one = torch.ones_like(t)
        f, df_dt = jvp(lambda s: self.field(s, x), (t,), (one,))
        e0, e0_dt = jvp(lambda s: self.eps0(s, x), (t,), (one,))
        _, e0_along_f = jvp(lambda y: self.eps0(t, y), (x,), (f,))
        return e0[:, None] * df_dt + (e0_dt + e0_along_f)[:, None] * f


def lie_derivative(field: Field, eps: Field) -> nn.Module:
    r"""The first-order change of `F` under the spatial map `x_old = x_new + ε(t, x_new)`.

    Eq. (16):
    $\delta F^i = F^i_{,j}\,\varepsilon^j - \varepsilon^i_{,j}\,F^j - \partial_t \varepsilon^i$,
    so that the pullback by `φ_t = id + s ε` is `F + s δF + O(s²)`. Computed with three
    forward-mode jvps (no Jacobian matrices); meant for evaluation at points, not inside
    a solve (forward mode through constant products is slow in torch).

    **Arguments:**

    - `field`: `F(t, x)`, `x` `(batch, d)` to `(batch, d)`.
    - `eps`: the generator `ε(t, x)`, same shapes; it should vanish at `t = 0` and
        `t = T` for the deformation to be a gauge symmetry (Theorem 2.1).

    **Returns:** the field `δF(t, x)` as an `nn.Module`.
    """
    return _LieDerivative(field, eps)


def time_shift_derivative(field: Field, eps0: Callable[[Tensor, Tensor], Tensor]) -> nn.Module:
    r"""The first-order change of `F` under the time shift `t_old = t_new + ε⁰(t_new, x)`.

    $\delta F = \varepsilon^0\,\partial_t F
    + (\partial_t \varepsilon^0 + F\cdot\nabla\varepsilon^0)\,F$; for `ε⁰` independent of `x`
    this is eq. (20), $F\,\dot\varepsilon^0 + \partial_t F\,\varepsilon^0$.

    **Arguments:**

    - `field`: `F(t, x)`, `x` `(batch, d)` to `(batch, d)`.
    - `eps0`: `ε⁰(t, x)`, `x` `(batch, d)` to `(batch,)`.

    **Returns:** the field `δF(t, x)` as an `nn.Module`.
    """
    return _TimeShiftDerivative(field, eps0)
