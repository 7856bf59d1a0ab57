"""Numerical building blocks of the diffeomorphisms: fixed-step flows and Jacobians.

Everything here is pure tensor code, so that `torch.func` transforms (vjp, vmap) pass
through it: adaptive solvers branch on the data and cannot be differentiated that way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vjp, vmap

__all__ = [
    "bisect_increasing",
    "fix_ends",
    "rk4_flow",
    "rowwise",
    "scalar_gradients",
    "spacetime_jacobian",
]

RowMap = Callable[[Tensor, Tensor], Tensor]
ScalarMap = Callable[[Tensor, Tensor], Tensor]


def rk4_flow(f: RowMap, x: Tensor, t0: Tensor, t1: Tensor, n_steps: int) -> Tensor:
    """Integrate `ẋ = f(t, x)` from `t0` to `t1` with `n_steps` classical Runge-Kutta steps.

    For fixed `n_steps` the result is a smooth function of `(t0, t1, x)`, so its
    derivatives (by `torch.func`) are the exact derivatives of the map it computes.

    **Arguments:**

    - `f`: field `f(t, x)`, `t` scalar tensor, `x` of shape `(batch, d)`.
    - `x`: initial state `(batch, d)`; `t0`, `t1`: scalar tensors.

    **Returns:** the state at `t1`, shape `(batch, d)`.
    """
    h = (t1 - t0) / n_steps
    t = t0
    for _ in range(n_steps):
        k1 = f(t, x)
        k2 = f(t + h / 2, x + (h / 2) * k1)
        k3 = f(t + h / 2, x + (h / 2) * k2)
        k4 = f(t + h, x + h * k3)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        t = t + h
    return x


def spacetime_jacobian(fn: RowMap, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Value, time derivative and spatial Jacobian of a sample-wise map `fn(t, x)`.

    `fn` acts on each row of `x` separately, so one reverse-mode vjp per output
    coordinate (the `d` of them vmapped together) gives every row's Jacobian at once.
    The time is shared by all rows; its per-row derivative is the transpose of the
    (linear) map `u ↦ Σ_b u_b · ∂_t y_b`, one more vjp. Reverse mode is used because
    forward-mode products with constant tensors are slow in torch.

    **Arguments:**

    - `fn`: map `(t, x) -> y`, `t` scalar tensor, `x` and `y` of shape `(batch, d)`.
    - `t`: scalar tensor; `x`: shape `(batch, d)`.

    **Returns:** `y` `(batch, d)`, `∂_t y` `(batch, d)` and `D_x y` `(batch, d, d)`.
    """
    batch, d = x.shape
    y, vjp_fn = vjp(fn, t, x)
    eye = torch.eye(d, dtype=y.dtype, device=y.device)
    rows = vmap(lambda u: vjp_fn(u)[1])(eye[:, None, :].expand(d, batch, d))
    _, transpose = vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(y))
    (dy_dt,) = transpose(torch.ones_like(t))
    return y, dy_dt, rows.transpose(0, 1)


def scalar_gradients(fn: ScalarMap, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Value, time derivative and gradient of a sample-wise scalar function `fn(t, x)`.

    **Arguments:**

    - `fn`: map `(t, x) -> e`, `t` scalar tensor, `x` `(batch, d)`, `e` `(batch,)`.

    **Returns:** `e` `(batch,)`, `∂_t e` `(batch,)` and `∇_x e` `(batch, d)`.
    """
    e, vjp_fn = vjp(fn, t, x)
    (grad_x,) = vjp_fn(torch.ones_like(e))[1:]
    _, transpose = vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(e))
    (de_dt,) = transpose(torch.ones_like(t))
    return e, de_dt, grad_x


def rowwise(fn: RowMap) -> Callable[[Tensor, Tensor], Tensor]:
    """Evaluate `fn(t, x)` with a different time in each row: `t` `(batch,)`, `x` `(batch, d)`."""

    def single(ti: Tensor, xi: Tensor) -> Tensor:
        return fn(ti, xi[None])[0]

    return vmap(single)


def fix_ends(
    fn: Callable[[Tensor, Tensor], Tensor], T: float
) -> Callable[[Tensor, Tensor], Tensor]:
    r"""Force a function of `(t, x)` to vanish at `t = 0` and `t = T`.

    Multiplies it by the window $4\,(t/T)(1 - t/T)$, which is exactly zero in floating
    point at both ends (unlike $\sin(\pi t/T)$ at $t = T$) and one at $t = T/2$.
    """

    def fixed(t: Tensor, x: Tensor) -> Tensor:
        s = t / T
        return (4 * s * (1 - s)) * fn(t, x)

    return fixed


def bisect_increasing(
    g: Callable[[Tensor], Tensor], target: Tensor, lo: float, hi: float, n_iter: int = 60
) -> Tensor:
    """Solve `g(s) = target` elementwise for an increasing `g` on `[lo, hi]` by bisection."""
    a = torch.full_like(target, lo)
    b = torch.full_like(target, hi)
    for _ in range(n_iter):
        m = (a + b) / 2
        below = g(m) < target
        a = torch.where(below, m, a)
        b = torch.where(below, b, m)
    return (a + b) / 2
