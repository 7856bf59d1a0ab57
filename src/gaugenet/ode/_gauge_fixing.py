"""Gauge fixings of linear neural ODEs: two canonical representatives of a gauge orbit.

The orbit of a linear neural ODE is fixed by its affine holonomy `Â_{T:0}` (the input-output
map). Any path `Â'_{t:0}` from `1` to `Â_{T:0}` defines a node in the orbit, reached by the
gauge path `Ĝ(t) = Â_{t:0} (Â'_{t:0})⁻¹` (eq. 46 read backwards), whose derivative is
`dĜ/dt = M̂(t) Ĝ − Ĝ M̂'(t)`.

- Constant gauge: `Â'_{t:0} = exp(t L̂)`, `L̂ = log(Â_{T:0}) / T`, so `w'`, `b'` are constant.
- Straight-line gauge: `Â'_{t:0} = 1 + t M̂₀`, `M̂₀ = (Â_{T:0} − 1) / T`, so every trajectory is
  a straight line at constant speed (`ẍ = 0`, the zero set of the regularizer of eq. 45).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ._gauge_paths import TimePath
from ._lift import principal_log
from ._linear_node import LinearNODE
from ._parametrizations import PiecewiseConstant

__all__ = ["constant_gauge", "straight_line_gauge"]


def _nonpositive_eigs(H: Tensor) -> str:
    """The eigenvalues of `H` on `(−∞, 0]`, printed (empty string if none)."""
    ev = torch.linalg.eigvals(H.detach())
    scale = float(ev.abs().max().clamp_min(1e-300))
    bad = (ev.imag.abs() <= 1e-12 * scale) & (ev.real <= 1e-14 * scale)
    found = sorted(float(z.real) for z in ev[bad])
    return "[" + ", ".join(f"{v:.6g}" for v in found) + "]" if found else ""


def _path(
    node: LinearNODE, prime: Callable[[Tensor], Tensor], gen: Callable[[Tensor], Tensor]
) -> tuple[TimePath, TimePath]:
    """`(G, c)` from `Ĝ(t) = Â_{t:0} Â'(t)⁻¹`; `prime(t)` is `Â'_{t:0}`, `gen(t)` its `M̂'(t)`."""
    d = node.d
    zero = torch.zeros((), dtype=node.dtype)

    def G_hat(t: Tensor) -> Tensor:
        return torch.linalg.solve(prime(t), node.flow(t, zero), left=False)

    def G_hat_dot(t: Tensor) -> Tensor:
        Gh = G_hat(t)
        return node.augmented(t) @ Gh - Gh @ gen(t)

    G = TimePath(lambda t: G_hat(t)[:, :d, :d], lambda t: G_hat_dot(t)[:, :d, :d], vectorized=True)
    c = TimePath(lambda t: G_hat(t)[:, :d, d], lambda t: G_hat_dot(t)[:, :d, d], vectorized=True)
    return G, c


def constant_gauge(node: LinearNODE) -> tuple[LinearNODE, tuple[TimePath, TimePath]]:
    """The constant gauge `w' ≡ log(W_{T:0}) / T` (and `b'` constant too).

    **Returns:** `(new_node, (G, c))`: the node with constant `w'`, `b'`, and the gauge path
    (old `x = G x' + c`) that reaches it. Raises `GaugeError` with the offending eigenvalues
    when `W_{T:0}` has an eigenvalue on `(−∞, 0]` (no real principal logarithm).
    """
    A = node.affine_holonomy().detach()
    L = principal_log(A)
    if L is None:
        raise GaugeError(
            "constant gauge: the holonomy W_{T:0} has eigenvalues "
            f"{_nonpositive_eigs(A[: node.d, : node.d])} on (−∞, 0], so it has no real "
            "principal logarithm and no constant w' reaches it"
        )
    L = L / node.T
    d, T = node.d, node.T
    new = LinearNODE(
        PiecewiseConstant(L[None, :d, :d], T),
        PiecewiseConstant(L[None, :d, d], T),
        T,
        rtol=node.rtol,
        method=node.method,
    )

    def prime(t: Tensor) -> Tensor:
        return torch.linalg.matrix_exp(t[:, None, None] * L)

    return new, _path(node, prime, lambda t: L.expand(t.shape[0], -1, -1))


class _StraightLine(nn.Module):
    """`M̂'(t) = M̂₀ (1 + t M̂₀)⁻¹`, the generator of `Â'_{t:0} = 1 + t M̂₀`."""

    def __init__(self, M0: Tensor) -> None:
        super().__init__()
        self.register_buffer("M0", M0)

    def forward(self, t: Tensor) -> Tensor:
        eye = torch.eye(self.M0.shape[-1], dtype=self.M0.dtype, device=self.M0.device)
        return torch.linalg.solve(
            eye + t[:, None, None] * self.M0, self.M0.expand(t.shape[0], -1, -1)
        )


def straight_line_gauge(node: LinearNODE) -> tuple[LinearNODE, tuple[TimePath, TimePath]]:
    """The straight-line gauge `W'_{t:0} = 1 + t w₀`, `w₀ = (W_{T:0} − 1) / T`, i.e.
    `w'(t) = w₀ (1 + t w₀)⁻¹` and `b'(t) = (1 + t w₀)⁻¹ β₀`: every trajectory is
    `x'(t) = x(0) + t (x(T) − x(0)) / T`.

    **Returns:** `(new_node, (G, c))`. Raises `GaugeError` with the offending eigenvalues when
    `W_{T:0}` has an eigenvalue on `(−∞, 0]` (then `1 + t w₀` is singular at some `t`).
    """
    A = node.affine_holonomy().detach()
    d, T = node.d, node.T
    bad = _nonpositive_eigs(A[:d, :d])
    if bad:
        raise GaugeError(
            f"straight-line gauge: the holonomy W_{{T:0}} has eigenvalues {bad} on (−∞, 0], so "
            "1 + t w₀ is singular for some t in (0, T]"
        )
    eye = torch.eye(d + 1, dtype=node.dtype)
    M0 = (A - eye) / T
    field = _StraightLine(M0)
    new = LinearNODE(
        lambda t: field(t)[:, :d, :d],
        lambda t: field(t)[:, :d, d],
        T,
        rtol=node.rtol,
        method=node.method,
    )
    new.field = field
    return new, _path(node, lambda t: eye + t[:, None, None] * M0, field)
