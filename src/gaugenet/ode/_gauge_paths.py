"""Paths `t ↦ G(t)`, `t ↦ c(t)` of gauge transformations of linear neural ODEs (eq. 24-25).

A `TimePath` evaluates a user's callable at a scalar time or at a 1-D tensor of times and
supplies its time derivative, given or by forward-mode autograd. Time reparametrizations
(eq. 26-27) are the special gauge paths `Ĝ(t) = Â_{t:τ(t)}` built from the node's own flow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import jacfwd, vmap

from .._errors import GaugeError
from ._gl_plus import gl_plus_violation

if TYPE_CHECKING:
    from ._linear_node import LinearNODE

__all__ = [
    "TimePath",
    "as_path",
    "check_gauge_path",
    "random_gauge_path",
    "time_reparametrization",
]


class TimePath:
    """A differentiable path of matrices or vectors in time.

    **Arguments:**

    - `fn`: the path. With `vectorized=False` it maps a scalar time tensor to `(d, d)` or
      `(d,)` and is batched with `torch.func.vmap`; with `vectorized=True` it maps a 1-D
      tensor of `m` times to `(m, d, d)` or `(m, d)`.
    - `derivative`: its time derivative, called the same way; `None`: forward-mode autograd
      (`torch.func.jacfwd`).
    - `breakpoints`: times where the path is less smooth than elsewhere (piecewise paths).

    `path(t)` accepts a scalar or a 1-D tensor of times; `path.dot(t)` likewise.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        derivative: Callable[[Tensor], Tensor] | None = None,
        *,
        vectorized: bool = False,
        breakpoints: Tensor | None = None,
    ) -> None:
        self.fn, self.derivative, self.vectorized = fn, derivative, vectorized
        self.breakpoints = breakpoints

    @staticmethod
    def _call(f: Callable[[Tensor], Tensor], t: Tensor, vectorized: bool) -> Tensor:
        t = torch.as_tensor(t)
        flat = t.reshape(-1)
        out = f(flat) if vectorized else vmap(f)(flat)
        return out.reshape(*t.shape, *out.shape[1:])

    def __call__(self, t: Tensor) -> Tensor:
        return self._call(self.fn, t, self.vectorized)

    def dot(self, t: Tensor) -> Tensor:
        """The time derivative at `t`."""
        if self.derivative is not None:
            return self._call(self.derivative, t, self.vectorized)
        if self.vectorized:
            return self._call(jacfwd(lambda s: self.fn(s.reshape(1))[0]), t, False)
        return self._call(jacfwd(self.fn), t, False)


def as_path(p: TimePath | Callable[[Tensor], Tensor], derivative=None) -> TimePath:
    """`p` itself if it is a `TimePath`, else a scalar-time callable wrapped as one."""
    if isinstance(p, TimePath):
        return p if derivative is None else TimePath(p.fn, derivative, vectorized=p.vectorized)
    return TimePath(p, derivative)


def check_gauge_path(G: TimePath, c: TimePath, T: float, d: int, dtype: torch.dtype) -> None:
    """Raise `GaugeError` unless `G(0) = G(T) = 1`, `c(0) = c(T) = 0` (to 1e-10) and `G(t)`
    stays in GL⁺(d) on `[0, T]`: `det G > 0` on 513 times and at the golden-section refined
    minima of `σ_min/σ_max` between them (`gl_plus_violation`), which finds double roots of
    `det G` that change no sign."""
    ends = torch.tensor([0.0, T], dtype=dtype)
    eye = torch.eye(d, dtype=dtype)
    G_end, c_end = G(ends).detach(), c(ends).detach()
    if G_end.shape != (2, d, d) or c_end.shape != (2, d):
        raise GaugeError(
            f"gauge path: G(t), c(t) must be ({d}, {d}) and ({d},), got "
            f"{tuple(G_end.shape[1:])} and {tuple(c_end.shape[1:])}"
        )
    for k, name in enumerate(("0", "T")):
        dev = float((G_end[k] - eye).abs().max())
        if dev > 1e-10:
            raise GaugeError(f"boundary condition violated: G({name}) differs from 1 by {dev:.3e}")
        dev = float(c_end[k].abs().max())
        if dev > 1e-10:
            raise GaugeError(f"boundary condition violated: c({name}) differs from 0 by {dev:.3e}")
    found = gl_plus_violation(G, T, dtype, extra=G.breakpoints)
    if found is not None:
        raise GaugeError(
            f"gauge path: G(t) leaves GL⁺(d) (singular or det <= 0): {found.describe()}"
        )


def random_gauge_path(
    d: int,
    T: float = 1.0,
    *,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> tuple[TimePath, TimePath]:
    """A random smooth gauge path with `G(0) = G(T) = 1`, `c(0) = c(T) = 0`, `G(t) ∈ GL⁺(d)`:
    `G(t) = exp(sin(πt/T) (A₀ + (t/T) A₁))`, `c(t) = sin(πt/T) (c₀ + (t/T) c₁)`.
    Both carry their exact time derivatives."""
    A = scale * torch.randn(2, d, d, dtype=dtype, generator=generator) / math.sqrt(d)
    c = scale * torch.randn(2, d, dtype=dtype, generator=generator)

    def X(t: Tensor) -> tuple[Tensor, Tensor]:
        s, r = torch.sin(math.pi * t / T)[:, None, None], (t / T)[:, None, None]
        ds = (math.pi / T) * torch.cos(math.pi * t / T)[:, None, None]
        return s * (A[0] + r * A[1]), ds * (A[0] + r * A[1]) + s * A[1] / T

    def G(t: Tensor) -> Tensor:
        return torch.linalg.matrix_exp(X(t)[0])

    def G_dot(t: Tensor) -> Tensor:
        # d/dt exp(X) is the top-right block of exp([[X, Ẋ], [0, X]]).
        x, xd = X(t)
        big = torch.cat([torch.cat([x, xd], -1), torch.cat([torch.zeros_like(x), x], -1)], -2)
        return torch.linalg.matrix_exp(big)[:, :d, d:]

    def cpath(t: Tensor) -> Tensor:
        return torch.sin(math.pi * t / T)[:, None] * (c[0] + (t / T)[:, None] * c[1])

    def c_dot(t: Tensor) -> Tensor:
        ds = (math.pi / T) * torch.cos(math.pi * t / T)[:, None]
        return (
            ds * (c[0] + (t / T)[:, None] * c[1]) + torch.sin(math.pi * t / T)[:, None] * c[1] / T
        )

    return TimePath(G, G_dot, vectorized=True), TimePath(cpath, c_dot, vectorized=True)


def time_reparametrization(
    node: LinearNODE, tau: Callable[[Tensor], Tensor], tau_dot: Callable | None = None
) -> tuple[LinearNODE, tuple[TimePath, TimePath]]:
    """A monotone time reparametrization `τ: [0, T] → [0, T]`, `τ(0) = 0`, `τ(T) = T`, as a gauge
    transformation.

    The new node is `w'(t) = τ'(t) w(τ(t))`, `b'(t) = τ'(t) b(τ(t))`, whose solution is
    `x'(t) = x(τ(t))`. The gauge path reaching it (old `x = G x' + c`) is the block
    `Ĝ(t) = [[G, c], [0, 1]] = Â_{t:τ(t)}` of the augmented Wilson line; to first order in
    `τ(t) = t + ε(t)` it is `G = 1 - ε w`, `c = -ε b` (eq. 26-27, with the opposite sign of ε).

    **Arguments:** `tau` and `tau_dot` map a 1-D tensor of times to a 1-D tensor (`tau_dot` by
    autograd if not given).

    **Returns:** `(new_node, (G, c))`.
    """
    from ._linear_node import LinearNODE

    T, d = node.T, node.d
    tau_path = TimePath(tau, tau_dot, vectorized=True)
    ends = torch.tensor([0.0, T], dtype=node.dtype)
    gap = float((tau_path(ends) - ends).abs().max())
    if gap > 1e-10 * max(1.0, T):
        raise GaugeError(f"time reparametrization must fix 0 and T: τ(0), τ(T) off by {gap:.3e}")
    grid = torch.linspace(0.0, T, 257, dtype=node.dtype)
    slope = tau_path.dot(grid)
    if not bool((slope > 0).all()):
        bad = grid[slope <= 0][0]
        raise GaugeError(f"time reparametrization is not increasing: τ'({float(bad):.4g}) <= 0")

    def w_new(t: Tensor) -> Tensor:
        return tau_path.dot(t)[:, None, None] * node.w(tau_path(t))

    def b_new(t: Tensor) -> Tensor:
        return tau_path.dot(t)[:, None] * node.b(tau_path(t))

    def G_hat(t: Tensor) -> Tensor:
        return node.flow(t, tau_path(t))

    def G_hat_dot(t: Tensor) -> Tensor:
        A, s = G_hat(t), tau_path(t)
        return node.augmented(t) @ A - A @ node.augmented(s) * tau_path.dot(t)[:, None, None]

    G = TimePath(lambda t: G_hat(t)[:, :d, :d], lambda t: G_hat_dot(t)[:, :d, :d], vectorized=True)
    c = TimePath(lambda t: G_hat(t)[:, :d, d], lambda t: G_hat_dot(t)[:, :d, d], vectorized=True)
    new = LinearNODE(w_new, b_new, T, rtol=node.rtol, method=node.method)
    return new, (G, c)
