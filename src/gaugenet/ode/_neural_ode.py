"""Neural ODEs `ẋ = F(t, x)` (paper eq. 1), solved with torchdiffeq."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from .._errors import GaugeError

if TYPE_CHECKING:
    from ._diffeo import AbstractDiffeo

__all__ = ["Field", "MLPField", "NeuralODE", "as_field_module"]

Field = Callable[[Tensor, Tensor], Tensor]
"""A vector field `F(t, x)`: `t` a scalar tensor, `x` `(batch, d)`, returns `(batch, d)`."""


class _CallableField(nn.Module):
    """An `nn.Module` around a plain callable field, so that adjoint solves accept it."""

    def __init__(self, fn: Field) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.fn(t, x)


def as_field_module(field: Field) -> nn.Module:
    """Return `field` itself if it is an `nn.Module`, else an `nn.Module` that calls it."""
    return field if isinstance(field, nn.Module) else _CallableField(field)


class MLPField(nn.Module):
    r"""The time-dependent tanh MLP field $F(t, x) = W_2 \tanh(W_1 x + u\,t + b_1) + b_2$.

    **Arguments:**

    - `d`: state dimension.
    - `hidden`: hidden width.
    - `scale`: overall scale of the output weights (keeps the flow tame).
    - `dtype`, `generator`: dtype and random generator of the initial weights.
    """

    def __init__(
        self,
        d: int,
        hidden: int = 16,
        *,
        scale: float = 1.0,
        dtype: torch.dtype = torch.float64,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, dtype=dtype, generator=generator)

        self.w1 = nn.Parameter(randn(hidden, d) / d**0.5)
        self.u = nn.Parameter(randn(hidden))
        self.b1 = nn.Parameter(randn(hidden) * 0.5)
        self.w2 = nn.Parameter(randn(d, hidden) * scale / hidden**0.5)
        self.b2 = nn.Parameter(randn(d) * 0.1 * scale)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1.T + self.u * t + self.b1) @ self.w2.T + self.b2


class NeuralODE(nn.Module):
    """The neural ODE `ẋ = F(t, x)`, `x(0) = z`, output `x(T)` (paper eq. 1).

    **Arguments:**

    - `field`: the vector field `F(t, x)`, an `nn.Module` or a callable; `t` is a scalar
        tensor and `x` has shape `(batch, d)`.
    - `T`: the final time.
    - `rtol`, `atol`, `method`: passed to torchdiffeq (`method="dopri5"` by default).
    - `adjoint`: solve with `odeint_adjoint` (memory-light gradients; then the field's
        parameters are the ones that receive gradients).

    `node(x0)` maps `x0` of shape `(batch, d)` to `x(T)` of shape `(batch, d)`, in the
    dtype of `x0`, differentiably.
    """

    def __init__(
        self,
        field: Field,
        T: float = 1.0,
        *,
        rtol: float = 1e-7,
        atol: float = 1e-9,
        method: str = "dopri5",
        adjoint: bool = False,
    ) -> None:
        super().__init__()
        if not T > 0:
            raise GaugeError(f"NeuralODE: the final time T must be positive, got {T}")
        self.field = as_field_module(field)
        self.T = float(T)
        self.rtol = rtol
        self.atol = atol
        self.method = method
        self.adjoint = adjoint

    def _solve(self, x0: Tensor, ts: Tensor) -> Tensor:
        if x0.ndim != 2:
            raise GaugeError(f"NeuralODE: x0 must have shape (batch, d), got {tuple(x0.shape)}")
        solve = odeint_adjoint if self.adjoint else odeint
        return solve(self.field, x0, ts, rtol=self.rtol, atol=self.atol, method=self.method)

    def forward(self, x0: Tensor) -> Tensor:
        ts = torch.tensor([0.0, self.T], dtype=x0.dtype, device=x0.device)
        return self._solve(x0, ts)[-1]

    def trajectory(self, x0: Tensor, ts: Tensor) -> Tensor:
        """The states at times `ts` (increasing, starting anywhere in `[0, T]`).

        **Arguments:**

        - `x0`: the state at time `ts[0]`, shape `(batch, d)`.
        - `ts`: times, shape `(n,)`.

        **Returns:** shape `(n, batch, d)`.
        """
        return self._solve(x0, torch.as_tensor(ts, dtype=x0.dtype, device=x0.device))

    def with_field(self, field: Field) -> NeuralODE:
        """A neural ODE with the same `T` and solver options and another field."""
        return NeuralODE(
            field,
            self.T,
            rtol=self.rtol,
            atol=self.atol,
            method=self.method,
            adjoint=self.adjoint,
        )

    def pullback(self, diffeo: AbstractDiffeo) -> NeuralODE:
        """The gauge-transformed neural ODE, with field `diffeo.pullback_field(F)`.

        With the project convention (old state `= φ_t(new state)`), the new field is
        `F'(t, x') = Dφ_t(x')⁻¹ [F(t, φ_t(x')) − ∂_t φ_t(x')]` for a spatial map and
        `τ'(t) F(τ(t), x)` for a time reparametrization. When the map is the identity
        at `t = 0` and `t = T`, the input-output map is unchanged (Theorem 2.1).
        """
        if abs(diffeo.T - self.T) > 1e-12 * max(1.0, self.T):
            raise GaugeError(f"pullback: the diffeomorphism has T = {diffeo.T}, the ODE {self.T}")
        return self.with_field(diffeo.pullback_field(self.field))
