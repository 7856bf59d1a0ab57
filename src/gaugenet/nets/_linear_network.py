"""Linear networks `x(n+1) = w̄_n x(n) + b̄_n` (paper eq. 31) and their affine gauge group."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._errors import GaugeError

__all__ = ["LinearNetwork"]


def _check_square(ws: Sequence[Tensor], bs: Sequence[Tensor]) -> int:
    if len(ws) == 0 or len(ws) != len(bs):
        raise GaugeError(f"need as many weights as biases, at least one: got {len(ws)}, {len(bs)}")
    d = ws[0].shape[-1]
    for n, (w, b) in enumerate(zip(ws, bs)):
        if w.shape != (d, d) or b.shape != (d,):
            raise GaugeError(
                f"layer {n}: weight {tuple(w.shape)} and bias {tuple(b.shape)}, expected ({d}, {d})"
                f" and ({d},)"
            )
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise GaugeError(f"layer {n}: weight or bias has non-finite entries")
    return d


class LinearNetwork(nn.Module):
    """A linear network of `N` layers of width `d` (eq. 31).

    **Arguments:**

    - `weights`: `N` matrices `w̄_n` of shape `(d, d)`.
    - `biases`: `N` vectors `b̄_n` of shape `(d,)`.

    Parameters are named `weights.n` and `biases.n`. `net(x)` maps `x` of shape
    `(batch, d)` to `x(N)` of shape `(batch, d)`.

    Its gauge group (eq. 33) is the affine group `GA(d)` at every interior layer
    `n = 1, ..., N-1`: old `x(n) = G_n x'(n) + c_n`, with `G_0 = G_N = 1`, `c_0 = c_N = 0`.
    """

    def __init__(self, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> None:
        super().__init__()
        self.d = _check_square(list(weights), list(biases))
        self.weights = nn.ParameterList([nn.Parameter(torch.as_tensor(w).clone()) for w in weights])
        self.biases = nn.ParameterList([nn.Parameter(torch.as_tensor(b).clone()) for b in biases])

    @property
    def depth(self) -> int:
        return len(self.weights)

    @classmethod
    def random(
        cls, d: int, depth: int, *, dtype: torch.dtype = torch.float64, generator=None
    ) -> LinearNetwork:
        """Random weights near the identity (det > 0) and random biases."""
        ws = [
            torch.eye(d, dtype=dtype)
            + torch.randn(d, d, dtype=dtype, generator=generator) / (2 * d**0.5)
            for _ in range(depth)
        ]
        bs = [torch.randn(d, dtype=dtype, generator=generator) for _ in range(depth)]
        return cls(ws, bs)

    def forward(self, x: Tensor) -> Tensor:
        """The plain forward pass, layer by layer. `x`: `(batch, d)`."""
        for w, b in zip(self.weights, self.biases):
            x = x @ w.T + b
        return x

    def closed_form(self, x: Tensor) -> Tensor:
        """Eq. (34), evaluated without matrix inverses.

        `x(N) = P_{N-1:0} x(0) + Σ_m P_{N-1:m+1} b̄_m` with `P_{N-1:m} = w̄_{N-1} ⋯ w̄_m`,
        which equals the paper's `(w̄_{N-1}⋯w̄_0)(x(0) + Σ_m w̄_0⁻¹⋯w̄_m⁻¹ b̄_m)` whenever the
        inverses exist, and also when they do not.
        """
        d = self.d
        eye = torch.eye(d, dtype=self.weights[0].dtype, device=self.weights[0].device)
        suffix = [eye]  # suffix[k] = w̄_{N-1} ⋯ w̄_{N-k}
        for w in reversed(list(self.weights)):
            suffix.append(suffix[-1] @ w)
        n = self.depth
        shift = sum(suffix[n - 1 - m] @ self.biases[m] for m in range(n))
        return x @ suffix[n].T + shift

    def product(self) -> Tensor:
        """`w̄_{N-1} ⋯ w̄_0`, shape `(d, d)`."""
        out = self.weights[0]
        for w in list(self.weights)[1:]:
            out = w @ out
        return out

    def gauge_factors(self, prefix: str = "") -> tuple[list, list]:
        """The affine factors `GA(d)` of eq. (33), one per interior layer `n = 1..N-1`."""
        from ..groups import AffineFactor, AffineTerm

        pre = f"{prefix}." if prefix else ""
        factors = []
        for n in range(1, self.depth):
            terms = (
                AffineTerm(f"{pre}weights.{n - 1}", f"{pre}biases.{n - 1}", "left"),
                AffineTerm(f"{pre}weights.{n}", f"{pre}biases.{n}", "right"),
            )
            factors.append(
                AffineFactor(f"{pre}affine:{n}", self.d, terms=terms, modules=(prefix or "",))
            )
        return factors, []

    def gauge_transform(self, Gs: Sequence[Tensor], cs: Sequence[Tensor]) -> LinearNetwork:
        """The transformed network of eq. (33) for `G_0..G_N`, `c_0..c_N` (project convention,
        old `x(n) = G_n x'(n) + c_n`): `w̄_n ↦ G_{n+1}⁻¹ w̄_n G_n`,
        `b̄_n ↦ G_{n+1}⁻¹ (b̄_n + w̄_n c_n − c_{n+1})`.

        Raises `GaugeError` if `G_0`, `G_N` are not the identity, `c_0`, `c_N` not zero,
        or some `G_n` is singular or non-finite.
        """
        n_layers, d = self.depth, self.d
        if len(Gs) != n_layers + 1 or len(cs) != n_layers + 1:
            raise GaugeError(
                f"need N + 1 = {n_layers + 1} matrices and shifts, got {len(Gs)}, {len(cs)}"
            )
        ref = self.weights[0]
        Gs = [torch.as_tensor(G, dtype=ref.dtype) for G in Gs]
        cs = [torch.as_tensor(c, dtype=ref.dtype) for c in cs]
        eye = torch.eye(d, dtype=ref.dtype)
        for end in (0, n_layers):
            dev = float((Gs[end] - eye).abs().max())
            if dev > 1e-12:
                raise GaugeError(
                    f"boundary condition violated: G_{end} differs from 1 by {dev:.3e}"
                )
            dev = float(cs[end].abs().max())
            if dev > 1e-12:
                raise GaugeError(
                    f"boundary condition violated: c_{end} differs from 0 by {dev:.3e}"
                )
        for n, G in enumerate(Gs):
            _check_invertible(G, f"G_{n}")
        ws, bs = [], []
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            G_next = Gs[n + 1]
            ws.append(torch.linalg.solve(G_next, w.detach() @ Gs[n]))
            bs.append(torch.linalg.solve(G_next, b.detach() + w.detach() @ cs[n] - cs[n + 1]))
        return LinearNetwork(ws, bs)


def _check_invertible(G: Tensor, where: str) -> None:
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise GaugeError(f"{where}: expected a square matrix, got shape {tuple(G.shape)}")
    if not torch.isfinite(G).all():
        raise GaugeError(f"{where}: matrix has non-finite entries")
    s = torch.linalg.svdvals(G.double())
    if s[-1] <= s[0] * 1e-13 or s[0] == 0:
        raise GaugeError(
            f"{where}: matrix is singular (smallest singular value {float(s[-1]):.3e})"
        )
