"""Trainable time-dependent coefficients `w(t)`, `b(t)` for linear neural ODEs.

Each is an `nn.Module` mapping a 1-D tensor of `m` times to `(m, *shape)`, with its values as
parameters. A parametrization with jumps lists them in `breakpoints`, so that Wilson lines are
integrated piece by piece (a Magnus step across a jump would lose its order).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._errors import GaugeError

__all__ = ["Chebyshev", "PiecewiseConstant"]


class PiecewiseConstant(nn.Module):
    """Constant on each of `N` equal intervals of `[0, T]`.

    **Arguments:**

    - `values`: `(N, *shape)`, the value on `[nT/N, (n+1)T/N)` (e.g. `(N, d, d)` for `w`,
      `(N, d)` for `b`); a trainable parameter.
    - `T`: the final time.
    - `edges`: optional `(N + 1,)` increasing interval edges from `0` to `T` (equal by default).

    Times outside `[0, T]` take the nearest end value.
    """

    def __init__(self, values: Tensor, T: float = 1.0, *, edges: Tensor | None = None) -> None:
        super().__init__()
        values = torch.as_tensor(values)
        if values.ndim < 1 or values.shape[0] < 1:
            raise GaugeError(f"PiecewiseConstant: need (N, ...) values, got {tuple(values.shape)}")
        n = values.shape[0]
        if edges is None:
            edges = torch.linspace(0.0, T, n + 1, dtype=values.dtype)
        edges = torch.as_tensor(edges, dtype=values.dtype)
        if edges.shape != (n + 1,) or not bool((edges[1:] > edges[:-1]).all()):
            raise GaugeError(f"PiecewiseConstant: need {n + 1} increasing edges")
        self.T = float(T)
        self.values = nn.Parameter(values.clone())
        self.register_buffer("edges", edges.clone())

    @property
    def breakpoints(self) -> Tensor:
        """The interior jump times, `(N - 1,)`."""
        return self.edges[1:-1]

    def forward(self, t: Tensor) -> Tensor:
        idx = torch.searchsorted(self.edges[1:-1].contiguous(), t.contiguous(), right=True)
        return self.values[idx]

    @classmethod
    def random(
        cls,
        shape: tuple[int, ...],
        n: int,
        T: float = 1.0,
        *,
        scale: float = 1.0,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
    ) -> PiecewiseConstant:
        """Standard normal values times `scale`, `n` pieces of shape `shape`."""
        return cls(scale * torch.randn(n, *shape, dtype=dtype, generator=generator), T)


class Chebyshev(nn.Module):
    """A polynomial in `t` of degree `K - 1` in the Chebyshev basis on `[0, T]`:
    `f(t) = Σ_k c_k T_k(2t/T - 1)`.

    **Arguments:**

    - `coeffs`: `(K, *shape)`, a trainable parameter.
    - `T`: the final time.
    """

    def __init__(self, coeffs: Tensor, T: float = 1.0) -> None:
        super().__init__()
        coeffs = torch.as_tensor(coeffs)
        if coeffs.ndim < 1 or coeffs.shape[0] < 1:
            raise GaugeError(f"Chebyshev: need (K, ...) coefficients, got {tuple(coeffs.shape)}")
        self.T = float(T)
        self.coeffs = nn.Parameter(coeffs.clone())

    breakpoints = None

    def basis(self, t: Tensor) -> Tensor:
        """`T_k(2t/T - 1)` for `k < K`, shape `(m, K)`, by the three-term recurrence."""
        s = 2 * t / self.T - 1
        cols = [torch.ones_like(s), s]
        for _ in range(2, self.coeffs.shape[0]):
            cols.append(2 * s * cols[-1] - cols[-2])
        return torch.stack(cols[: self.coeffs.shape[0]], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return torch.tensordot(self.basis(t).to(self.coeffs.dtype), self.coeffs, dims=1)

    @classmethod
    def random(
        cls,
        shape: tuple[int, ...],
        degree: int,
        T: float = 1.0,
        *,
        scale: float = 1.0,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
    ) -> Chebyshev:
        """Coefficients standard normal times `scale / (k + 1)` (decaying with the degree)."""
        k = torch.arange(degree + 1, dtype=dtype).reshape(-1, *([1] * len(shape)))
        c = torch.randn(degree + 1, *shape, dtype=dtype, generator=generator) * scale / (k + 1)
        return cls(c, T)
