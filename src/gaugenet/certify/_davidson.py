"""Eigensolvers on an operator given by its products: a few Lanczos steps for the largest
eigenvalue, and a preconditioned Davidson method (GD+k) for the smallest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._orbit import Orbit

__all__ = ["lanczos_max", "smallest"]

Operator = Callable[[Tensor], Tensor]


def power_max(op: Operator, start: Tensor, steps: int) -> float:
    """The Rayleigh quotient after `steps` power steps from `start` (one vector kept): a
    lower bound of the largest eigenvalue of the PSD `op`."""
    v, lam = start / start.norm(), 0.0
    for _ in range(steps):
        w = op(v)
        lam = float(v @ w)
        v = w / w.norm().clamp_min(1e-300)
    return lam


def lanczos_max(op: Operator, start: Tensor, steps: int) -> float:
    """The largest Ritz value of `steps` Lanczos steps (fully reorthogonalized) from
    `start`: a lower bound of the largest eigenvalue, close for a few tens of steps."""
    basis = [start / start.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(steps):
        w = op(basis[-1])
        alphas.append(float(w @ basis[-1]))
        v = torch.stack(basis, 1)
        for _ in range(2):
            w = w - v @ (v.T @ w)
        beta = float(w.norm())
        if beta <= 1e-12 * max(abs(a) for a in alphas) or len(basis) == steps:
            break
        betas.append(beta)
        basis.append(w / beta)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(t)[-1])


@dataclass
class _Ritz:
    theta: float
    residual: float
    vector: Tensor
    products: int
    converged: bool


class _Davidson:
    """Generalized Davidson with thick restarts that keep the previous Ritz vector too
    (GD+k, as in PRIMME), block size one, for the smallest eigenvalue of a symmetric
    positive semi-definite `op` on the range of `proj`."""

    def __init__(self, op: Operator, proj: Orbit, n: int, m_max: int) -> None:
        self.op, self.proj = op, proj
        self.m_max = m_max
        self.v = torch.zeros(n, m_max, dtype=torch.float64)
        self.av = torch.zeros(n, m_max, dtype=torch.float64)
        self.h = torch.zeros(m_max, m_max, dtype=torch.float64)
        self.m = 0
        self.products = 0

    def _orthonormal(self, w: Tensor) -> Tensor | None:
        """`w` orthogonalized against the basis (classical Gram-Schmidt, repeated while the
        norm drops by more than half: "twice is enough"), unit; `None` if spanned."""
        v = self.v[:, : self.m]
        norm0 = norm = float(w.norm())
        for _ in range(3):
            w = self.proj(w - v @ (v.T @ w))
            before, norm = norm, float(w.norm())
            if norm > 0.5 * before:
                break
        return None if norm <= 1e-10 * max(norm0, 1e-300) else w / norm

    def _append(self, w: Tensor, aw: Tensor) -> None:
        k = self.m
        self.v[:, k], self.av[:, k] = w, aw
        self.m = k + 1
        row = self.v[:, : k + 1].T @ aw
        self.h[: k + 1, k] = row
        self.h[k, : k + 1] = row

    def expand(self, w: Tensor, gen: torch.Generator) -> bool:
        """Add `w`, orthonormalized (a random direction where it is already spanned);
        `False` when even those are: the basis spans the whole space."""
        q = self._orthonormal(w)
        for _ in range(3):
            if q is not None:
                break
            q = self._orthonormal(torch.randn(w.shape, generator=gen, dtype=w.dtype))
        if q is None:
            return False
        self._append(q, self.op(q))
        self.products += 1
        return True

    def restart(self, y: Tensor, prev: tuple[Tensor, Tensor] | None) -> None:
        """Keep the Ritz vectors `V y` (and the previous Ritz vector, when independent)."""
        v, av = self.v[:, : self.m] @ y, self.av[:, : self.m] @ y
        if prev is not None:
            x, ax = prev
            norm0 = float(x.norm())
            for _ in range(2):  # the previous Ritz vector is nearly in the span: twice
                c = v.T @ x
                x, ax = x - v @ c, ax - av @ c
            if float(x.norm()) > 1e-6 * norm0:
                v, av = torch.cat([v, x[:, None]], 1), torch.cat([av, ax[:, None]], 1)
        # orthonormal again (rounding accumulates over restarts); A V follows linearly
        q, r = torch.linalg.qr(v)
        av = torch.linalg.solve_triangular(r, av, upper=True, left=False)
        v = q
        k = v.shape[1]
        self.v[:, :k], self.av[:, :k] = v, av
        h = v.T @ av
        self.h[:k, :k] = (h + h.T) / 2
        self.m = k

    def ritz(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`(θ, y, x, Ax)`: Ritz values, their coordinates, the smallest pair's vectors."""
        theta, y = torch.linalg.eigh(self.h[: self.m, : self.m])
        return theta, y, self.v[:, : self.m] @ y[:, 0], self.av[:, : self.m] @ y[:, 0]


def smallest(
    op: Operator,
    prec: Operator,
    proj: Orbit,
    start: Tensor,
    *,
    lmax: float,
    max_iter: int,
    tol: float,
    zero_tol: float,
    gen: torch.Generator,
    m_max: int = 48,
    keep: int = 12,
) -> _Ritz:
    """GD+k until `residual ≤ tol · θ`, `θ ≤ zero_tol² · lmax`, or `max_iter` products."""
    n = start.numel()
    free = n - proj.rank
    m_max = max(2, free if free <= 512 else m_max)  # small: the basis may fill the space
    keep = max(1, min(keep, m_max - 2))
    dav = _Davidson(op, proj, n, m_max)
    dav.expand(start, gen)
    prev: tuple[Tensor, Tensor] | None = None
    while True:
        theta, y, x, ax = dav.ritz()
        th = float(theta[0])
        res = float((ax - th * x).norm())
        done = res <= tol * th or th <= zero_tol**2 * lmax
        if done or dav.products >= max_iter or dav.m >= n - proj.rank:
            break
        if dav.m == m_max:
            dav.restart(y[:, :keep], prev)
        prev = (x, ax)
        if not dav.expand(prec(ax - th * x), gen):
            break
    # the reported pair: re-projected, with a fresh product (not the recurrence's)
    x = proj(x)
    x = x / x.norm()
    ax = op(x)
    th = float(x @ ax)
    res = float((ax - th * x).norm())
    ok = res <= tol * th or th <= zero_tol**2 * lmax
    return _Ritz(th, res, x, dav.products, ok)
