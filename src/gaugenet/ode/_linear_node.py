"""Linear neural ODEs `ẋ = w(t) x + b(t)` (paper eq. 21), solved through Wilson lines.

Everything runs on the augmented generator `M̂(t) = [[w(t), b(t)], [0, 0]]` of size `d + 1`:
its Wilson line `Â_{t1:t0} = [[W_{t1:t0}, ∫_{t0}^{t1} W_{t1:t'} b(t') dt'], [0, 1]]` holds the
explicit solution (eq. 22) and both discretized parameters of eq. (32) at once, and the affine
gauge transformation (eq. 25) is the conjugation `M̂' = Ĝ⁻¹ M̂ Ĝ − Ĝ⁻¹ dĜ/dt` by
`Ĝ = [[G, c], [0, 1]]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ..nets import LinearNetwork
from ._gauge_paths import TimePath, as_path, check_gauge_path
from ._wilson import MagnusMethod, ordered_product, prefix_products, wilson_line

__all__ = ["LinearNODE"]

Field = Callable[[Tensor], Tensor]


class _Zero(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.d, self.dtype = d, dtype

    def forward(self, t: Tensor) -> Tensor:
        return torch.zeros(t.shape[0], self.d, dtype=self.dtype, device=t.device)


class _Gauged(nn.Module):
    """The augmented generator of `base` after the gauge path `Ĝ = [[G, c], [0, 1]]`.

    With `check`, `det G > 0` is verified again at every time the integrator evaluates the
    generator (its own nodes), besides the search of `check_gauge_path`."""

    def __init__(self, base: LinearNODE, G: TimePath, c: TimePath, check: bool = False) -> None:
        super().__init__()
        self.base, self.G, self.c, self.check = base, G, c, check

    def forward(self, t: Tensor) -> Tensor:
        d = self.base.d
        Gt, Gd, ct, cd = self.G(t), self.G.dot(t), self.c(t), self.c.dot(t)
        if self.check:
            sign, logabs = torch.linalg.slogdet(Gt.detach())
            bad = (sign <= 0) | ~torch.isfinite(logabs)
            if bool(bad.any()):
                raise GaugeError(
                    f"gauge path: G(t) leaves GL⁺(d) at t = {float(t[bad][0]):.6g}, a time "
                    f"the Wilson-line integrator evaluates (det G = "
                    f"{float(torch.linalg.det(Gt[bad][0].detach())):.3e})"
                )
        wt, bt = self.base.w(t), self.base.b(t)
        top = torch.cat([wt @ Gt - Gd, (wt @ ct[..., None] + bt[..., None] - cd[..., None])], -1)
        new = torch.linalg.solve(Gt, top)  # G⁻¹ [w G − Ġ | w c + b − ċ]
        zeros = torch.zeros(t.shape[0], 1, d + 1, dtype=new.dtype, device=new.device)
        return torch.cat([new, zeros], dim=-2)


class _Block(nn.Module):
    """`w` or `b` read off an augmented generator."""

    def __init__(self, field: nn.Module, part: str, d: int) -> None:
        super().__init__()
        self.field, self.part, self.d = field, part, d

    def forward(self, t: Tensor) -> Tensor:
        m = self.field(t)
        return m[:, : self.d, : self.d] if self.part == "w" else m[:, : self.d, self.d]


class LinearNODE(nn.Module):
    """The linear neural ODE `ẋ = w(t) x + b(t)` on `[0, T]` (eq. 21).

    **Arguments:**

    - `w`: callable (or `nn.Module`, e.g. `PiecewiseConstant`, `Chebyshev`) mapping a 1-D
      tensor of `m` times to `(m, d, d)`.
    - `b`: the same for `(m, d)`; `None` for `b ≡ 0`.
    - `T`: the final time.
    - `breakpoints`: extra times where `w` or `b` jump (those of parametrizations with a
      `breakpoints` attribute are picked up by themselves).
    - `rtol`, `method`: passed to `wilson_line` (default `1e-12` in float64, `Magnus6`).

    `node(x0)` maps `(batch, d)` to `x(T)` by the explicit solution (eq. 22); `node.w(t)`,
    `node.b(t)`, `node.T`, `node.d` are public.
    """

    def __init__(
        self,
        w: Field,
        b: Field | None = None,
        T: float = 1.0,
        *,
        breakpoints: Tensor | None = None,
        rtol: float | None = None,
        method: MagnusMethod | None = None,
    ) -> None:
        super().__init__()
        if not T > 0:
            raise GaugeError(f"LinearNODE: the final time T must be positive, got {T}")
        self.T, self.rtol, self.method = float(T), rtol, method
        with torch.no_grad():
            probe = w(torch.zeros(1, dtype=torch.float64 if _dtype_of(w) is None else _dtype_of(w)))
        if probe.ndim != 3 or probe.shape[-1] != probe.shape[-2]:
            raise GaugeError(
                f"LinearNODE: w(t) must have shape (m, d, d), got {tuple(probe.shape)}"
            )
        self.d, self.dtype = probe.shape[-1], probe.dtype
        self.w = w
        self.b = _Zero(self.d, self.dtype) if b is None else b
        self._extra_breaks = breakpoints

    # --- the generator and its Wilson lines -------------------------------------------------
    def augmented(self, t: Tensor) -> Tensor:
        """`M̂(t) = [[w(t), b(t)], [0, 0]]`, shape `(m, d + 1, d + 1)`."""
        t = torch.as_tensor(t, dtype=self.dtype)
        if (
            isinstance(self.w, _Block)
            and isinstance(self.b, _Block)
            and self.b.field is self.w.field
        ):
            return self.w.field(t)  # one evaluation of a transformed generator, not two
        wt, bt = self.w(t), self.b(t)
        top = torch.cat([wt, bt[..., None]], dim=-1)
        return torch.cat([top, torch.zeros_like(top[:, :1, :])], dim=-2)

    def breakpoints(self) -> Tensor:
        """Sorted interior times where the generator may jump."""
        parts = [getattr(f, "breakpoints", None) for f in (self.w, self.b)]
        parts.append(self._extra_breaks)
        found = [torch.as_tensor(p, dtype=self.dtype).reshape(-1) for p in parts if p is not None]
        if not found:
            return torch.zeros(0, dtype=self.dtype)
        allb = torch.unique(torch.cat(found))
        return allb[(allb > 0) & (allb < self.T)]

    def _wl(self, t1: Tensor, t0: Tensor) -> Tensor:
        return wilson_line(self.augmented, t1, t0, rtol=self.rtol, method=self.method)

    def interval_flows(self, edges: Tensor) -> Tensor:
        """`Â_{e[k+1]:e[k]}` for increasing `edges` `(K + 1,)`, split at breakpoints inside.
        Shape `(K, d + 1, d + 1)`."""
        edges = torch.as_tensor(edges, dtype=self.dtype)
        brk = self.breakpoints()
        near = (brk[:, None] - edges[None, :]).abs().amin(dim=1) if brk.numel() else brk
        inner = brk[(brk > edges[0]) & (brk < edges[-1]) & (near > 1e-12 * self.T)]
        if inner.numel() == 0:
            return self._wl(edges[1:], edges[:-1])
        fine = torch.unique(torch.cat([edges, inner]))
        F = self._wl(fine[1:], fine[:-1])
        pos = torch.searchsorted(fine, edges).tolist()
        return torch.stack([ordered_product(F[a:b]) for a, b in zip(pos[:-1], pos[1:])])

    def flow(self, t1: Tensor, t0: Tensor) -> Tensor:
        """The augmented Wilson line `Â_{t1:t0}`, batched: shape `S + (d + 1, d + 1)`."""
        t1, t0 = torch.broadcast_tensors(
            torch.as_tensor(t1, dtype=self.dtype), torch.as_tensor(t0, dtype=self.dtype)
        )
        if self.breakpoints().numel() == 0:
            return self._wl(t1, t0)
        # Jumps: prefix products on the merged grid, then Â_{t1:t0} = P(t1) P(t0)⁻¹.
        grid = torch.unique(torch.cat([t1.reshape(-1), t0.reshape(-1), self.breakpoints()]))
        P = prefix_products(self._wl(grid[1:], grid[:-1]))
        P1 = P[torch.searchsorted(grid, t1.reshape(-1))]
        P0 = P[torch.searchsorted(grid, t0.reshape(-1))]
        out = torch.linalg.solve(P0, P1, left=False)
        return out.reshape(*t1.shape, *out.shape[-2:])

    def wilson_line(self, t1: Tensor, t0: Tensor) -> Tensor:
        """`W_{t1:t0}` of this node's `w`, batched like `flow`."""
        return self.flow(t1, t0)[..., : self.d, : self.d]

    def holonomy(self) -> Tensor:
        """`W_{T:0}`, shape `(d, d)`: gauge invariant (eq. 46)."""
        return self.affine_holonomy()[: self.d, : self.d]

    def affine_holonomy(self) -> Tensor:
        """`Â_{T:0}`, shape `(d + 1, d + 1)`: the whole input-output map as one matrix."""
        edges = torch.tensor([0.0, self.T], dtype=self.dtype)
        return self.interval_flows(edges)[0]

    # --- solutions ---------------------------------------------------------------------------
    def vector_field(self, t: Tensor, x: Tensor) -> Tensor:
        """`F(t, x) = w(t) x + b(t)` for a scalar `t` and `x` `(batch, d)` (as `NeuralODE`
        takes a field)."""
        t1 = torch.as_tensor(t, dtype=self.dtype).reshape(1)
        return x @ self.w(t1)[0].T + self.b(t1)[0]

    def forward(self, x0: Tensor) -> Tensor:
        """`x(T)` for `x0` of shape `(batch, d)` by eq. (22)."""
        A = self.affine_holonomy()
        return x0 @ A[: self.d, : self.d].T + A[: self.d, self.d]

    def trajectory(self, x0: Tensor, ts: Tensor) -> Tensor:
        """`x(t)` at times `ts` `(m,)` for `x0` `(batch, d)`: shape `(m, batch, d)`."""
        A = self.flow(torch.as_tensor(ts, dtype=self.dtype), torch.zeros((), dtype=self.dtype))
        return torch.einsum("mij,bj->mbi", A[:, : self.d, : self.d], x0) + A[:, None, : self.d, -1]

    def discretize(self, N: int, scheme: str = "exact") -> LinearNetwork:
        """The linear network of `N` layers, `Δ = T/N` (eq. 31-32).

        - `scheme="exact"`: the integrated relation `w̄_n = W_{(n+1)Δ:nΔ}`,
          `b̄_n = ∫ W_{(n+1)Δ:t'} b(t') dt'`, both from one augmented Wilson line per layer.
        - `scheme="euler"`: the finite difference `w̄_n = 1 + Δ w(nΔ)`, `b̄_n = Δ b(nΔ)`.
        """
        if N < 1:
            raise GaugeError(f"discretize: N must be a positive integer, got {N}")
        edges = torch.linspace(0.0, self.T, N + 1, dtype=self.dtype)
        if scheme == "exact":
            A = self.interval_flows(edges)
            ws, bs = A[:, : self.d, : self.d], A[:, : self.d, self.d]
        elif scheme == "euler":
            delta, t = self.T / N, edges[:-1]
            ws = torch.eye(self.d, dtype=self.dtype) + delta * self.w(t)
            bs = delta * self.b(t)
        else:
            raise GaugeError(f"discretize: unknown scheme {scheme!r} (use 'exact' or 'euler')")
        return LinearNetwork(list(ws.detach()), list(bs.detach()))

    # --- gauge transformations ---------------------------------------------------------------
    def gauge_transform(
        self,
        G: TimePath | Field,
        c: TimePath | Field | None = None,
        *,
        G_dot: Field | None = None,
        c_dot: Field | None = None,
        check: bool = True,
    ) -> LinearNODE:
        """The gauge-transformed node of eq. (25), old `x = G(t) x' + c(t)`:
        `w' = G⁻¹ w G − G⁻¹ Ġ`, `b' = G⁻¹ (b + w c − ċ)`; `x'(T) = x(T)` for the same `x(0)`.

        **Arguments:**

        - `G`, `c`: `TimePath`s or callables of a scalar time giving `(d, d)` and `(d,)`
          (`c = None`: zero). `G_dot`, `c_dot`: their derivatives (else autograd).
        - `check`: verify `G(0) = G(T) = 1`, `c(0) = c(T) = 0` and that `G(t)` stays in
          GL⁺(d) (`det G > 0` on a grid, golden-section refinement of every dip of
          `σ_min/σ_max` between grid points, so double roots of `det G` are found too, and
          again at every time the integrator evaluates); raise `GaugeError` saying where
          otherwise. With `check=False` a path that breaks the boundary conditions is
          applied as given (the input-output map then changes).
        """
        G = as_path(G, G_dot)
        if c is None:
            zero = torch.zeros(self.d, dtype=self.dtype)
            c = TimePath(
                lambda t: zero.expand(t.shape[0], -1),
                lambda t: zero.expand(t.shape[0], -1),
                vectorized=True,
            )
        else:
            c = as_path(c, c_dot)
        if check:
            check_gauge_path(G, c, self.T, self.d, self.dtype)
        extra = [self.breakpoints()] + [p.breakpoints for p in (G, c) if p.breakpoints is not None]
        field = _Gauged(self, G, c, check)
        return LinearNODE(
            _Block(field, "w", self.d),
            _Block(field, "b", self.d),
            self.T,
            breakpoints=torch.cat([torch.as_tensor(e, dtype=self.dtype) for e in extra]),
            rtol=self.rtol,
            method=self.method,
        )

    def reparametrize_time(self, tau: Field, tau_dot: Field | None = None):
        """`w' = τ' w(τ)`, `b' = τ' b(τ)`; see `time_reparametrization`. Returns
        `(new_node, (G, c))`."""
        from ._gauge_paths import time_reparametrization

        return time_reparametrization(self, tau, tau_dot)

    def to_constant_gauge(self):
        """The gauge with `w' ≡ log(W_{T:0}) / T`; see `constant_gauge`."""
        from ._gauge_fixing import constant_gauge

        return constant_gauge(self)

    def to_straight_line_gauge(self):
        """The gauge with `W'_{t:0} = 1 + t w₀`; see `straight_line_gauge`."""
        from ._gauge_fixing import straight_line_gauge

        return straight_line_gauge(self)


def _dtype_of(f: Field) -> torch.dtype | None:
    if isinstance(f, nn.Module):
        for p in f.parameters():
            return p.dtype
    return None
