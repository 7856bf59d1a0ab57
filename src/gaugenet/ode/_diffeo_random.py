"""Random boundary-fixing diffeomorphisms, for tests and for the reproduction report.

With `batch=n`, row `b` of the states gets its own random map: one object then holds
`n` independent gauge transformations, and one ODE solve checks all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._diffeo import SpatialDiffeo
from ._diffeo_time import TimeReparam, TimeShift

__all__ = ["random_generator", "random_linear", "random_time_reparam", "random_time_shift"]


def _randn(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, dtype=dtype, generator=generator)


def random_generator(
    d: int,
    *,
    batch: int | None = None,
    hidden: int = 8,
    scale: float = 0.5,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A random tanh generator `ε(t, x) = C tanh(A x + u t + b)`, not vanishing at the ends.

    **Arguments:**

    - `d`: state dimension; `hidden`: width; `scale`: size of `ε`.
    - `batch`: `None` for one map acting on any batch; `n` for `n` maps, row `b` of
        `x` `(n, d)` transformed by map `b`.
    """
    lead = () if batch is None else (batch,)
    A = _randn((*lead, hidden, d), dtype, generator) / d**0.5
    u = _randn((*lead, hidden), dtype, generator)
    b = _randn((*lead, hidden), dtype, generator) * 0.5
    C = _randn((*lead, d, hidden), dtype, generator) * scale / hidden**0.5

    def eps(t: Tensor, x: Tensor) -> Tensor:
        h = torch.tanh((A @ x[..., None])[..., 0] + u * t + b)
        return (C @ h[..., None])[..., 0]

    return eps


def random_linear(
    d: int,
    T: float = 1.0,
    *,
    batch: int | None = None,
    scale: float = 0.5,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> SpatialDiffeo:
    """`G(t) = 1 + w(t) M`, `c(t) = w(t) v` with `w = 4 (t/T)(1 − t/T)` and `‖M‖₂ = scale < 1`.

    `batch` as in `random_generator` (`G` of shape `(batch, d, d)`).
    """
    lead = () if batch is None else (batch,)
    M = _randn((*lead, d, d), dtype, generator)
    M = M * (scale / torch.linalg.matrix_norm(M, ord=2)[..., None, None])
    v = _randn((*lead, d), dtype, generator)
    eye = torch.eye(d, dtype=dtype)

    def w(t: Tensor) -> Tensor:
        s = t / T
        return 4 * s * (1 - s)

    def w_dot(t: Tensor) -> Tensor:
        return 4 * (1 - 2 * t / T) / T

    return SpatialDiffeo.linear(
        lambda t: eye + w(t) * M,
        lambda t: w(t) * v,
        T,
        G_dot=lambda t: w_dot(t) * M,
        c_dot=lambda t: w_dot(t) * v,
    )


def random_time_reparam(
    T: float = 1.0,
    *,
    scale: float = 0.4,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> TimeReparam:
    """`τ(t) = t + a T s (1 − s)(1 + b s)`, `s = t/T`, `|a| ≤ scale ≤ 0.4`, `|b| ≤ 1`.

    These bounds keep `τ' > 0`: it is increasing.
    """
    a, b = (torch.rand(2, dtype=dtype, generator=generator) * 2 - 1) * torch.tensor(
        [min(scale, 0.4), 1.0], dtype=dtype
    )

    def tau(t: Tensor) -> Tensor:
        s = t / T
        return t + a * T * s * (1 - s) * (1 + b * s)

    return TimeReparam(tau, T)


def random_time_shift(
    d: int,
    T: float = 1.0,
    *,
    batch: int | None = None,
    hidden: int = 8,
    scale: float = 0.1,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> TimeShift:
    """`ε⁰(t, x) = a · tanh(P x + q t + r)`, small (`scale`), made to vanish at both ends."""
    lead = () if batch is None else (batch,)
    P = _randn((*lead, hidden, d), dtype, generator) / d**0.5
    q = _randn((*lead, hidden), dtype, generator)
    r = _randn((*lead, hidden), dtype, generator) * 0.5
    a = _randn((*lead, hidden), dtype, generator) * scale / hidden**0.5

    def eps0(t: Tensor, x: Tensor) -> Tensor:
        return (a * torch.tanh((P @ x[..., None])[..., 0] + q * t + r)).sum(-1)

    return TimeShift(eps0, T)
