"""Regularizers for general neural ODEs `ẋ = F(t, x)`, integrated as augmented states.

All three are integrals along each trajectory, solved together with it: the state of the
solve is `(x, r_1, ..., r_k)` with `ṙ_i = ρ_i(t, x)` (one scalar per sample and regularizer),
so the adaptive solver controls their error like that of `x`, and the regularizers cost no
extra solve. The densities:

- kinetic energy `ρ = ‖F(t, x)‖²`;
- Jacobian Frobenius norm `ρ = ‖∂F/∂x‖²_F`, by Hutchinson's estimator with a fixed set of
  probes `ε_k` (`E[‖(∂F/∂x) ε‖²] = ‖∂F/∂x‖²_F` for `E[ε εᵀ] = 1`), one forward-mode
  Jacobian-vector product per probe;
- total derivative `ρ = ‖∂_t F + (∂F/∂x) F‖² = ‖ẍ‖²`, one forward-mode pass with tangent
  `(1, F)`. For the linear field `F = w x + b` it is `‖(ẇ + w²) x + ḃ + w b‖²`, whose
  data-independent part is the gauge-fixing regularizer of eq. (45).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import jvp
from torchdiffeq import odeint

from .._errors import GaugeError

__all__ = [
    "jacobian_frobenius_density",
    "kinetic_density",
    "regularized_solve",
    "total_derivative_density",
]

Field = Callable[[Tensor, Tensor], Tensor]
NAMES = ("kinetic", "jacobian", "total_derivative")


def kinetic_density(field: Field, t: Tensor, x: Tensor) -> Tensor:
    """`‖F(t, x)‖²` per sample: `x` `(batch, d)` → `(batch,)`."""
    return (field(t, x) ** 2).sum(-1)


def jacobian_frobenius_density(field: Field, t: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson estimate of `‖∂F/∂x‖²_F` per sample.

    **Arguments:** `probes` `(k, batch, d)` with `E[ε εᵀ] = 1` (e.g. Rademacher or Gaussian),
    kept fixed so the estimate is a deterministic function of the parameters.

    **Returns:** `(batch,)`, `mean_k ‖(∂F/∂x) ε_k‖²`.
    """
    if probes.ndim != 3 or probes.shape[1:] != x.shape:
        raise GaugeError(
            f"probes must have shape (k, {x.shape[0]}, {x.shape[1]}), got {tuple(probes.shape)}"
        )
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for eps in probes:  # k is small and fixed; each probe is one batched jvp
        _, Je = jvp(lambda z: field(t, z), (x,), (eps,))
        total = total + (Je**2).sum(-1)
    return total / probes.shape[0]


def total_derivative_density(field: Field, t: Tensor, x: Tensor) -> Tensor:
    """`‖∂_t F + (∂F/∂x) F‖²` per sample (the squared acceleration `‖ẍ‖²`), `(batch,)`."""
    _, acc = jvp(field, (t, x), (torch.ones_like(t), field(t, x)))
    return (acc**2).sum(-1)


def regularized_solve(
    field: Field,
    x0: Tensor,
    T: float = 1.0,
    *,
    regularizers: Sequence[str] = ("kinetic", "jacobian"),
    probes: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    method: str = "dopri5",
    options: dict | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Solve `ẋ = F(t, x)` on `[0, T]` together with the chosen regularizer integrals.

    **Arguments:**

    - `field`: `F(t, x)`, `x` `(batch, d)`; `x0`: `(batch, d)`.
    - `regularizers`: any of `"kinetic"`, `"jacobian"`, `"total_derivative"`.
    - `probes`: `(k, batch, d)` Hutchinson probes for `"jacobian"` (required for it).
    - `rtol`, `atol`, `method`, `options`: passed to `torchdiffeq.odeint`.

    **Returns:** `(x(T), {name: (batch,) integral ∫_0^T ρ dt})`, differentiable with respect to
    the field's parameters and `x0`.
    """
    unknown = set(regularizers) - set(NAMES)
    if unknown:
        raise GaugeError(f"regularized_solve: unknown regularizers {sorted(unknown)}; use {NAMES}")
    if "jacobian" in regularizers and probes is None:
        raise GaugeError("regularized_solve: the 'jacobian' regularizer needs probes (k, batch, d)")
    names = list(regularizers)
    n, d = x0.shape

    def aug(t: Tensor, s: Tensor) -> Tensor:
        x = s[:, :d]
        rates = [field(t, x)]
        for name in names:
            if name == "kinetic":
                rates.append(kinetic_density(field, t, x)[:, None])
            elif name == "jacobian":
                rates.append(jacobian_frobenius_density(field, t, x, probes)[:, None])
            else:
                rates.append(total_derivative_density(field, t, x)[:, None])
        return torch.cat(rates, -1)

    s0 = torch.cat([x0, torch.zeros(n, len(names), dtype=x0.dtype, device=x0.device)], -1)
    ts = torch.tensor([0.0, T], dtype=x0.dtype, device=x0.device)
    sT = odeint(aug, s0, ts, rtol=rtol, atol=atol, method=method, options=options)[-1]
    return sT[:, :d], {name: sT[:, d + i] for i, name in enumerate(names)}
