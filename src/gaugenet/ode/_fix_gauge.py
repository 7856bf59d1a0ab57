"""Gauge fixing by optimization: slide a linear neural ODE along its own gauge orbit to the
minimum of a regularizer, its input-output map untouched.

The path is `G(t) = exp(K(t))`, `c(t)`, with `K(t) = s(t) Σ_j A_j T_j(2t/T − 1)` and
`c(t) = s(t) Σ_j C_j T_j(2t/T − 1)`, `s(t) = (t/T)(1 − t/T)`, `T_j` Chebyshev polynomials:
`K` and `c` vanish at both ends for every coefficient, so every iterate is a gauge
transformation (old `x = G x' + c`, eq. 25) and `x(T)` is the same at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ._gauge_paths import TimePath
from ._linear_node import LinearNODE

__all__ = ["GaugePath", "fix_gauge"]


class GaugePath(nn.Module):
    """The trainable gauge path `G(t) = exp(K(t))`, `c(t)` described in the module docstring.

    **Arguments:** `d`, `T`, `modes` (Chebyshev terms per entry), `dtype`. Starts at the
    identity path (`A = C = 0`).
    """

    def __init__(self, d: int, T: float, modes: int = 10, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.d, self.T, self.modes = d, float(T), modes
        self.A = nn.Parameter(torch.zeros(modes, d, d, dtype=dtype))
        self.C = nn.Parameter(torch.zeros(modes, d, dtype=dtype))

    def _basis(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """`φ_j(t) = s(t) T_j(u)` and `φ_j'(t)`, `u = 2t/T − 1`, both `(m, modes)`; the
        derivatives by the Chebyshev recurrence, so that no forward-mode pass is nested
        inside the regularizer's own."""
        u = 2 * t / self.T - 1
        vals, ders = [torch.ones_like(u), u], [torch.zeros_like(u), torch.ones_like(u)]
        for _ in range(2, self.modes):
            vals.append(2 * u * vals[-1] - vals[-2])
            ders.append(2 * vals[-2] + 2 * u * ders[-1] - ders[-2])
        Tj = torch.stack(vals[: self.modes], -1)
        dTj = torch.stack(ders[: self.modes], -1) * (2 / self.T)
        s = ((t / self.T) * (1 - t / self.T))[:, None]
        ds = ((1 - 2 * t / self.T) / self.T)[:, None]
        return s * Tj, ds * Tj + s * dTj

    def _G_and_dot(self, t: Tensor) -> tuple[Tensor, Tensor]:
        phi, dphi = self._basis(t)
        K = torch.einsum("mj,jab->mab", phi, self.A)
        Kd = torch.einsum("mj,jab->mab", dphi, self.A)
        # exp([[K, K̇], [0, K]]) = [[G, Ġ], [0, G]]: the derivative of exp(K(t)) in one go
        Z = torch.zeros_like(K)
        E = torch.linalg.matrix_exp(torch.cat([torch.cat([K, Kd], -1), torch.cat([Z, K], -1)], -2))
        return E[:, : self.d, : self.d], E[:, : self.d, self.d :]

    def G(self, t: Tensor) -> Tensor:
        return self._G_and_dot(t)[0]

    def G_dot(self, t: Tensor) -> Tensor:
        return self._G_and_dot(t)[1]

    def c(self, t: Tensor) -> Tensor:
        return self._basis(t)[0] @ self.C

    def c_dot(self, t: Tensor) -> Tensor:
        return self._basis(t)[1] @ self.C

    def paths(self) -> tuple[TimePath, TimePath]:
        """`(G, c)` as `TimePath`s with their exact derivatives."""
        return (
            TimePath(self.G, self.G_dot, vectorized=True),
            TimePath(self.c, self.c_dot, vectorized=True),
        )


@dataclass
class FixGaugeResult:
    """What `fix_gauge` returns: the fixed node, its gauge path and the history.

    - `node`: the gauge-fixed `LinearNODE` (its `w`, `b` depend on `path`'s parameters).
    - `path`: the `GaugePath` reaching it (old `x = G x' + c`).
    - `values`: regularizer value per iteration (first entry: the initial node).
    - `output_drift`: per iteration, `max |x'(T) − x(T)|` on the probe inputs (empty
      without probes).
    """

    node: LinearNODE
    path: GaugePath
    values: list[float] = field(default_factory=list)
    output_drift: list[float] = field(default_factory=list)


def fix_gauge(
    node: LinearNODE,
    regularizer: Callable[[LinearNODE], Tensor],
    *,
    modes: int = 10,
    iterations: int = 30,
    probe: Tensor | None = None,
) -> FixGaugeResult:
    """Minimize `regularizer` over the gauge orbit of `node`.

    **Arguments:**

    - `node`: a `LinearNODE` (its own parameters are not changed).
    - `regularizer`: maps a `LinearNODE` to a scalar, differentiable in the node's `w`, `b`
      (e.g. `gauge_fixing_regularizer`, whose minimum in the orbit is the straight-line
      gauge).
    - `modes`: Chebyshev terms of the path; `iterations`: L-BFGS outer iterations (each up
      to 20 evaluations, strong-Wolfe line search).
    - `probe`: optional inputs `(batch, d)`; then `output_drift` records how far `x(T)`
      moves at every iteration (it should stay at rounding level).

    **Returns:** a `FixGaugeResult`.
    """
    if iterations < 0:
        raise GaugeError(f"fix_gauge: iterations must be >= 0, got {iterations}")
    path = GaugePath(node.d, node.T, modes, node.dtype)
    G, c = path.paths()
    fixed = node.gauge_transform(G, c, check=False)
    result = FixGaugeResult(fixed, path)
    ref = node(probe).detach() if probe is not None else None

    def record() -> None:
        with torch.no_grad():
            result.values.append(float(regularizer(fixed)))
        if ref is not None:
            with torch.no_grad():
                result.output_drift.append(float((fixed(probe) - ref).abs().max()))

    record()
    opt = torch.optim.LBFGS(
        path.parameters(),
        lr=1.0,
        max_iter=20,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        value = regularizer(fixed)
        value.backward()
        return value

    for _ in range(iterations):
        opt.step(closure)
        record()
        if result.values[-1] <= 1e-12 * result.values[0]:
            break
    G_end = path.G(torch.tensor([0.0, node.T], dtype=node.dtype)).detach()
    if not torch.allclose(G_end, torch.eye(node.d, dtype=node.dtype).expand_as(G_end)):
        raise GaugeError("fix_gauge: the path left the boundary conditions (internal error)")
    return result
