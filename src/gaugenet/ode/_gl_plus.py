"""Whether a path `t ↦ G(t)` stays in GL⁺(d) on `[0, T]`, searched for rigorously enough that a
double root of `det G` between grid points is found.

A sign change of `det G` between two sampled times is a root by continuity. A double root
(`det G ≥ 0` touching zero) changes no sign: it shows as a dip of the relative singular-value
ratio `σ_min(G) / σ_max(G)`. Every sampled local minimum of that ratio is refined by a
golden-section search inside its bracket (all brackets at once), and the path is refused
where the ratio falls below `√ε` of the dtype (condition number above about 7e7 in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GLPlusViolation", "gl_plus_violation"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class GLPlusViolation:
    """Where a path leaves GL⁺(d): the time `t`, `det G(t)` and `σ_min/σ_max` there, and
    `what` in words (`"det G changes sign"`, `"G is (nearly) singular"`, `"non-finite"`)."""

    t: float
    det: float
    ratio: float
    what: str

    def describe(self) -> str:
        return (
            f"{self.what} at t = {self.t:.6g} (det G = {self.det:.3e}, "
            f"σ_min/σ_max = {self.ratio:.3e})"
        )


def _measure(G: Callable[[Tensor], Tensor], t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`det`, `σ_min/σ_max` (worst over any batch of maps) and finiteness at times `t`."""
    with torch.no_grad():
        g = G(t).detach()
        g = g.reshape(t.shape[0], -1, *g.shape[-2:])
        finite = torch.isfinite(g).flatten(1).all(1)
        g = torch.where(finite[:, None, None, None], g, torch.eye(g.shape[-1], dtype=g.dtype))
        det = torch.linalg.det(g)
        s = torch.linalg.svdvals(g)
        ratio = s[..., -1] / s[..., 0].clamp_min(torch.finfo(g.dtype).tiny)
        worst = det.argmin(1, keepdim=True)
    return det.gather(1, worst)[:, 0], ratio.amin(1), finite


def gl_plus_violation(
    G: Callable[[Tensor], Tensor],
    T: float,
    dtype: torch.dtype,
    *,
    n_grid: int = 513,
    extra: Tensor | None = None,
    n_refine: int = 32,
    iterations: int = 40,
) -> GLPlusViolation | None:
    """The first place where `G(t)` leaves GL⁺(d) on `[0, T]`, or `None`.

    **Arguments:**

    - `G`: maps a 1-D tensor of `m` times to `(m, d, d)` (or `(m, ..., d, d)`: several maps,
      all checked).
    - `T`, `dtype`: the interval `[0, T]` and the dtype of the times.
    - `n_grid`: sampled times (plus `extra`, e.g. breakpoints).
    - `n_refine`: the lowest sampled local minima of `σ_min/σ_max` refined by golden section;
      `iterations`: golden-section steps (each shrinks the bracket by 0.618).

    **Returns:** a `GLPlusViolation` (time, `det`, ratio, what) or `None`.
    """
    tol = torch.finfo(dtype).eps ** 0.5
    ts = torch.linspace(0.0, T, n_grid, dtype=dtype)
    if extra is not None and extra.numel():
        ts = torch.unique(torch.cat([ts, extra.to(dtype).reshape(-1).clamp(0.0, T)]))
    det, ratio, finite = _measure(G, ts)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        return GLPlusViolation(float(ts[i]), math.nan, math.nan, "G(t) has non-finite entries")
    bad = (det <= 0) | (ratio < tol)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        if det[i] <= 0 and i > 0:  # det changed sign in (ts[i-1], ts[i]]: bisect for the root
            lo, hi = ts[i - 1 : i], ts[i : i + 1]
            for _ in range(iterations):
                mid = (lo + hi) / 2
                neg = _measure(G, mid)[0] <= 0
                lo, hi = torch.where(neg, lo, mid), torch.where(neg, mid, hi)
            d1, r1, _ = _measure(G, hi)
            return GLPlusViolation(float(hi), float(d1), float(r1), "det G changes sign")
        what = "det G <= 0" if det[i] <= 0 else "G is (nearly) singular"
        return GLPlusViolation(float(ts[i]), float(det[i]), float(ratio[i]), what)
    return _refine_minima(G, ts, ratio, tol, n_refine, iterations)


def _refine_minima(
    G: Callable[[Tensor], Tensor],
    ts: Tensor,
    ratio: Tensor,
    tol: float,
    n_refine: int,
    iterations: int,
) -> GLPlusViolation | None:
    n = ts.shape[0]
    padded = torch.cat([ratio[:1] + 1, ratio, ratio[-1:] + 1])
    local = (padded[1:-1] < padded[:-2]) & (padded[1:-1] <= padded[2:])
    local &= ratio < 1 - 1e-6  # plateaus at 1 (rotations, the identity) hide no dip
    idx = local.nonzero()[:, 0]
    if idx.numel() == 0:
        return None
    idx = idx[ratio[idx].argsort()[:n_refine]]
    a = ts[(idx - 1).clamp_min(0)]
    b = ts[(idx + 1).clamp_max(n - 1)]
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _measure(G, c)[1], _measure(G, d)[1]
    best_t = torch.where(fc < fd, c, d)
    best_f = torch.minimum(fc, fd)
    for _ in range(iterations):
        left = fc < fd  # the minimum lies in [a, d]
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        new = torch.where(left, b - _GOLDEN * (b - a), a + _GOLDEN * (b - a))
        det_new, f_new, _ = _measure(G, new)
        if bool((det_new <= 0).any()):
            k = int((det_new <= 0).nonzero()[0])
            return GLPlusViolation(float(new[k]), float(det_new[k]), float(f_new[k]), "det G <= 0")
        c, d = torch.where(left, new, d), torch.where(left, c, new)
        fc, fd = torch.where(left, f_new, fd), torch.where(left, fc, f_new)
        better = f_new < best_f
        best_t, best_f = torch.where(better, new, best_t), torch.where(better, f_new, best_f)
    k = int(best_f.argmin())
    if best_f[k] < tol:
        det_k = _measure(G, best_t[k : k + 1])[0]
        return GLPlusViolation(
            float(best_t[k]), float(det_k), float(best_f[k]), "G is (nearly) singular"
        )
    return None
