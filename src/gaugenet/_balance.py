"""The balanced gauge of positive rescalings: minimal total squared norm, by Newton's method.

Unknowns: `u`, the log-scales of every `RescalingFactor`, concatenated (`α = exp(u)`).
Objective: `F(u) = Σ ‖p(u)‖²` over the model parameters the rescalings touch. `F` is
smooth, and convex in `u` but for the BatchNorm terms below (where the Hessian is not
positive definite the step falls back to the gradient), so Newton's method with a
backtracking (Armijo) line search,
started at the per-unit closed form `u = ¼ log(‖w_out‖² / ‖w_in‖²)` (exact when the units
decouple), converges quadratically to machine precision in a handful of steps.

The gradient and the full Hessian are assembled from the structure of the terms instead of
by differentiating through the model's parameters (reverse-over-reverse autograd over
~10⁵–10⁶ weights costs seconds per Hessian row block):

- *scaled* parameters, touched by `Scale` terms only: entry `e` becomes
  `p_e · exp(a_e·u)`, with `a_e` an integer vector holding one power per term (most entries
  have one or two nonzeros: their output and input channels). Entries with the same
  exponent pattern are merged once, `c_k = Σ_{e ∈ k} p_e²`, so that
  `F_s(u) = Σ_k c_k exp(2 a_k·u)`, `∇F_s = Σ_k 2 a_k w_k`, `∇²F_s = Σ_k 4 a_k a_kᵀ w_k` with
  `w_k = c_k exp(2 a_k·u)`. Both are `index_add`s over the patterns (e.g. one per
  (output, input) channel pair of a convolution, not one per kernel tap). A gain stored
  with an offset (`OffsetScale`, read as `w + c`) enters by its effective value `w + c`,
  which scales as `p_e` does: its balanced gauge balances the effective gains.
- *coupled* parameters, the BatchNorm weights and biases of `BatchNormShift` terms
  (`β ↦ β + (γμ/s)(1/α − 1)` is not a pure scaling): a few entries per channel, so the
  terms themselves are differentiated with `torch.func` (`grad` and `hessian` of a tiny
  function of `u`).

Everything runs in float64; the scales are returned in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .groups import BatchNormShift, Element, GaugeGroup, RescalingFactor, Scale
from .groups._base import State

__all__ = ["balanced_scales", "scale_norms"]


def scale_norms(f: RescalingFactor, state: State) -> tuple[Tensor, Tensor]:
    """Per unit: squared norm of the entries it multiplies (`in`) and divides (`out`)."""
    n_in = torch.zeros(f.n + 1, dtype=torch.float64)
    n_out = torch.zeros(f.n + 1, dtype=torch.float64)
    for t in f.terms:
        if isinstance(t, Scale):
            p = t.value(state[t.param].double())
            idx = t.index.expand(p.shape).reshape(-1)
            target = n_in if t.power > 0 else n_out
            target.index_add_(0, idx, p.reshape(-1) ** 2)
    return n_in[: f.n], n_out[: f.n]


def _unique_rows(rows: Tensor, base: int) -> tuple[Tensor, Tensor]:
    """`torch.unique(rows, dim=0, return_inverse=True)` for entries in `[0, base)`, via one
    integer key per row when it fits in int64 (much faster than `unique_dim`)."""
    if base ** rows.shape[1] >= 2**62:
        return torch.unique(rows, dim=0, return_inverse=True)
    radix = base ** torch.arange(rows.shape[1], dtype=torch.int64)
    keys, inverse = torch.unique((rows * radix).sum(1), return_inverse=True)
    return keys[:, None] // radix % base, inverse


class _ScaledPart:
    """`F_s(u) = Σ_k c_k exp(2 a_k·u)` over the exponent patterns `k` of the scaled entries.

    Pattern `k` is stored as variable indices `idx[k, j]` and powers `pow[k, j]`, `j < K`;
    unused slots point at the dummy variable `N` (fixed at `u = 0`) with power 0.
    """

    def __init__(self, terms: dict[str, list[tuple[Tensor, int]]], st: State, n: int) -> None:
        self.n = n
        k_max = max((len(ts) for ts in terms.values()), default=1)
        idx, pw, c = [], [], []
        for name, ts in terms.items():
            p = st[name]
            cols = torch.stack([g.expand(p.shape).reshape(-1) for g, _ in ts], 1)
            pat, inverse = _unique_rows(cols, n + 1)
            sq = torch.zeros(len(pat), dtype=torch.float64)
            c.append(sq.index_add_(0, inverse, p.reshape(-1) ** 2))
            powers = torch.tensor([float(q) for _, q in ts], dtype=torch.float64).expand(pat.shape)
            pad = k_max - len(ts)
            idx.append(torch.cat([pat, torch.full((len(pat), pad), n)], 1))
            pw.append(torch.cat([powers, torch.zeros(len(pat), pad, dtype=torch.float64)], 1))
        self.idx = torch.cat(idx) if idx else torch.full((0, k_max), n)
        self.pow = torch.cat(pw) if pw else torch.zeros(0, k_max, dtype=torch.float64)
        self.c = torch.cat(c) if c else torch.zeros(0, dtype=torch.float64)
        # flat (row, column) positions in the (N+1)² Hessian of every pair of slots
        self.pairs = (self.idx[:, :, None] * (n + 1) + self.idx[:, None, :]).reshape(-1)
        self.pow_pairs = (self.pow[:, :, None] * self.pow[:, None, :]).reshape(len(self.c), -1)

    def _weights(self, u: Tensor) -> Tensor:
        u_ext = torch.cat([u, u.new_zeros(1)])
        return self.c * torch.exp(2 * (self.pow * u_ext[self.idx]).sum(1))

    def value(self, u: Tensor) -> Tensor:
        return self._weights(u).sum()

    def derivatives(self, u: Tensor) -> tuple[Tensor, Tensor]:
        w = self._weights(u)
        n1 = self.n + 1
        g = torch.zeros(n1, dtype=torch.float64)
        g.index_add_(0, self.idx.reshape(-1), (2 * self.pow * w[:, None]).reshape(-1))
        h = torch.zeros(n1 * n1, dtype=torch.float64)
        h.index_add_(0, self.pairs, (4 * self.pow_pairs * w[:, None]).reshape(-1))
        return g[: self.n], h.reshape(n1, n1)[: self.n, : self.n]


def balanced_scales(group: GaugeGroup, state: State, params: set[str]) -> Element:
    """The rescalings minimizing the squared norm of the touched `params` (see module doc)."""
    factors = [f for f in group.factors if isinstance(f, RescalingFactor)]
    if not factors:
        return {}
    st = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    touched = {p for f in factors for p in f.params()} & params
    coupled = {
        name
        for f in factors
        for t in f.terms
        if isinstance(t, BatchNormShift)
        for name in (t.weight, t.bias)
    }
    sizes = [f.n for f in factors]
    n = sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(factors))]

    # scaled parameters: per term, the global variable of each entry (n: not scaled)
    scaled: dict[str, list[tuple[Tensor, int]]] = {}
    values: State = {}  # what the scales multiply: a gain stored with an offset, `w + c`
    for f, off in zip(factors, offsets):
        for t in f.terms:
            if isinstance(t, Scale) and t.param in touched and t.param not in coupled:
                var = torch.where(t.index == f.n, n, t.index + off)
                scaled.setdefault(t.param, []).append((var, t.power))
                values[t.param] = t.value(st[t.param])
    part = _ScaledPart(scaled, values, n)

    # coupled parameters: the terms themselves, on the few entries they touch
    coupled_terms = [
        [t for t in f.terms if isinstance(t, BatchNormShift) or t.param in coupled] for f in factors
    ]
    small = {
        name: st[name]
        for ts in coupled_terms
        for t in ts
        for name in ((t.param,) if isinstance(t, Scale) else (t.weight, t.bias, t.mean, t.var))
    }
    summed = sorted(coupled & touched)

    def coupled_value(u: Tensor) -> Tensor:
        cur = dict(small)
        for ts, uf in zip(coupled_terms, torch.split(u, sizes)):
            alpha_ext = torch.cat([torch.exp(uf), uf.new_ones(1)])
            for t in ts:
                t(cur, alpha_ext)
        return sum(((cur[p] ** 2).sum() for p in summed), u.new_zeros(()))

    coupled_grad = torch.func.grad(coupled_value)
    coupled_hess = torch.func.hessian(coupled_value)

    def objective(u: Tensor) -> float:
        return float(part.value(u) + coupled_value(u))

    # closed form per unit (exact when units decouple), as the starting point
    u0 = []
    for f in factors:
        n_in, n_out = scale_norms(f, st)
        ok = (n_in > 0) & (n_out > 0)
        log_ratio = n_out.clamp_min(1e-300).log() - n_in.clamp_min(1e-300).log()
        u0.append(torch.where(ok, 0.25 * log_ratio, torch.zeros_like(n_in)))
    u = torch.cat(u0)
    f_u = objective(u)
    for _ in range(100):
        g, H = part.derivatives(u)
        g = g + coupled_grad(u)
        if g.abs().max() <= 1e-15 * max(f_u, 1e-300):
            break
        H = H + coupled_hess(u)
        H = H + 1e-12 * H.diagonal().abs().max().clamp_min(1e-300) * torch.eye(n, dtype=H.dtype)
        step = torch.linalg.solve(H, -g)
        slope = float(g @ step)
        if not slope < 0:
            # the BatchNorm terms are not convex in `u`: where the Hessian is not positive
            # definite the Newton step may climb; descend along the gradient instead
            step = -g
            slope = float(g @ step)
        t = 1.0
        while t > 1e-10:
            trial = objective(u + t * step)
            if trial <= f_u + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            break  # no decrease left at float64 resolution: converged
        u, f_u = u + t * step, trial
    out_dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    return {f.name: torch.exp(uf).to(out_dtype) for f, uf in zip(factors, torch.split(u, sizes))}
