"""Time reparametrizations of neural ODEs: `τ(t)` (eq. 17-20) and the space-dependent
time shift `t ↦ t + ε⁰(t, x)`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad

from .._errors import GaugeError
from ._diffeo import AbstractDiffeo
from ._diffeo_tools import bisect_increasing, fix_ends, rowwise, scalar_gradients
from ._neural_ode import Field, as_field_module

__all__ = ["TimeReparam", "TimeShift"]


class TimeReparam(AbstractDiffeo):
    """A monotone reparametrization of time: old time `= τ`(new time), state unchanged.

    The new solution is `x'(t) = x(τ(t))`, which solves `ẋ' = τ'(t) F(τ(t), x')`; with
    `τ(0) = 0`, `τ(T) = T` the input-output map is unchanged.

    **Arguments:**

    - `tau`: `τ(t)` of a scalar tensor `t`, a scalar tensor; differentiable by
        `torch.func` (its derivative is taken by forward mode).
    - `T`: the final time.
    - `atol`: tolerance of the checks `τ(0) = 0`, `τ(T) = T`.
    - `n_check`: number of times where `τ' > 0` is checked.

    **Raises:** `GaugeError` if an endpoint moves or `τ` is not increasing at a
    checked time. `tau(t)` evaluates `τ` (any shape of `t`), `tau.inverse(t)` its inverse.
    """

    def __init__(
        self,
        tau: Callable[[Tensor], Tensor],
        T: float = 1.0,
        *,
        atol: float = 1e-12,
        n_check: int = 1001,
    ) -> None:
        super().__init__()
        if not T > 0:
            raise GaugeError(f"TimeReparam: T must be positive, got {T}")
        self.tau = tau
        self.T = float(T)
        with torch.no_grad():
            for t in (0.0, self.T):
                moved = (tau(torch.tensor(t, dtype=torch.float64)) - t).abs().item()
                if not moved <= atol:
                    raise GaugeError(
                        f"TimeReparam: τ must fix the endpoint t = {t:g}; it moves it by "
                        f"{moved:.3e} (tolerance {atol:.0e})"
                    )
            ts = torch.linspace(0.0, self.T, n_check, dtype=torch.float64)
            rate = torch.stack([self.rate(t) for t in ts])
            bad = torch.nonzero(~(rate > 0))
            if len(bad):
                i = bad[0, 0]
                raise GaugeError(
                    f"TimeReparam: τ must be increasing; τ'(t) = {rate[i].item():.3e} at "
                    f"t = {ts[i].item():.4g} ({len(bad)} of {n_check} checked times)"
                )

    def forward(self, t: Tensor) -> Tensor:
        return (
            self.tau(t)
            if t.ndim == 0
            else torch.stack([self.tau(s) for s in t.flatten()]).view(t.shape)
        )

    def rate(self, t: Tensor) -> Tensor:
        """`τ'(t)` at a scalar tensor `t` (reverse mode: one scalar input, one output)."""
        return grad(self.tau)(t)

    def inverse(self, t: Tensor) -> Tensor:
        """`τ⁻¹(t)` elementwise, by bisection on `[0, T]`."""
        return bisect_increasing(self, t, 0.0, self.T)

    def _pull(self, field: Field, t: Tensor, x: Tensor) -> Tensor:
        return self.rate(t) * field(self.tau(t), x)

    def spacetime(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.tau(t), x

    def spacetime_inverse(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(t), x


class TimeShift(AbstractDiffeo):
    """The space-dependent time shift: old `(t, x) = (t + ε⁰(t, x), x)`.

    The new solution `x'(t) = x(t + ε⁰(t, x'(t)))` solves
    `ẋ' = (1 + ∂_t ε⁰) F(t + ε⁰, x') / (1 − ∇ε⁰ · F(t + ε⁰, x'))`. This needs time to
    run forward along every trajectory: `1 + ∂_t ε⁰ > 0` and `1 − ∇ε⁰ · F > 0` (true for
    small `ε⁰`; not checked). For `ε⁰` independent of `x` it is a `TimeReparam` with
    `τ(t) = t + ε⁰(t)`, and its first order is eq. (20).

    **Arguments:**

    - `eps0`: `ε⁰(t, x)`, `t` scalar tensor, `x` `(batch, d)`, returns `(batch,)`;
        row-wise and differentiable by `torch.func`.
    - `T`: the final time.
    - `fix_boundary`: force `ε⁰` to vanish at `t = 0` and `t = T` (as
        `SpatialDiffeo.from_generator` does); `False` keeps it as given.
    """

    def __init__(
        self, eps0: Callable[[Tensor, Tensor], Tensor], T: float = 1.0, *, fix_boundary: bool = True
    ) -> None:
        super().__init__()
        if not T > 0:
            raise GaugeError(f"TimeShift: T must be positive, got {T}")
        self.T = float(T)
        self.raw_shift = as_field_module(eps0)
        self.shift = fix_ends(self.raw_shift, self.T) if fix_boundary else self.raw_shift

    def _pull(self, field: Field, t: Tensor, x: Tensor) -> Tensor:
        e0, e0_t, grad_e0 = scalar_gradients(self.shift, t, x)
        f = rowwise(field)(t + e0, x)
        return ((1 + e0_t) / (1 - (grad_e0 * f).sum(-1)))[:, None] * f

    def spacetime(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return t + self.shift(t, x), x

    def spacetime_inverse(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        shifted = rowwise(lambda s, y: s + self.shift(s, y)[..., None])
        new_t = bisect_increasing(lambda s: shifted(s, x)[:, 0], t, 0.0, self.T)
        return new_t, x
