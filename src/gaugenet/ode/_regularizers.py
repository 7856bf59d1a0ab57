"""The gauge-fixing regularizer of eq. (45) and the rotation-invariant Higgs kinetic term.

For a linear neural ODE `ẋ = w x + b` the acceleration of a trajectory is
`ẍ = (ẇ + w²) x + (ḃ + w b)` (eq. 43-44), so

    L_R = λ ∫_0^T (‖ẇ + w²‖² + ‖ḃ + w b‖²) dt                                  (45)

vanishes exactly when every trajectory is a straight line at constant speed: inside a gauge
orbit, on the straight-line gauge. Footnote 12's kinetic term uses instead the covariant
derivative of the project convention, `D_t b = ḃ − w b`, which transforms as
`(D_t b)' = G⁻¹ D_t b` when `c = 0`, so `∫ ‖D_t b‖² dt` is invariant under rotations.

Both integrals use Gauss-Legendre quadrature on each smooth piece of `[0, T]` (split at the
node's breakpoints; jumps of `w`, `b` there are not penalized), with `ẇ`, `ḃ` from
forward-mode autograd in `t` (`torch.func.jvp`); both are differentiable with respect to the
node's parameters.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.func import jvp

from .._errors import GaugeError
from ._linear_node import LinearNODE

__all__ = ["covariant_higgs_kinetic", "gauge_fixing_regularizer", "gauss_legendre"]


def gauss_legendre(edges: Tensor, order: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of `order`-point Gauss-Legendre rules on each interval of `edges`.

    **Returns:** `(t, weights)`, both `(len(edges) - 1) * order` long.
    """
    if order < 1:
        raise GaugeError(f"gauss_legendre: order must be a positive integer, got {order}")
    x, wq = np.polynomial.legendre.leggauss(order)
    x = torch.as_tensor(x, dtype=edges.dtype)
    wq = torch.as_tensor(wq, dtype=edges.dtype)
    a, b = edges[:-1, None], edges[1:, None]
    t = (a + b) / 2 + (b - a) / 2 * x
    return t.reshape(-1), ((b - a) / 2 * wq).reshape(-1)


def _grid(node: LinearNODE, order: int) -> tuple[Tensor, Tensor]:
    brk = node.breakpoints().detach()
    edges = torch.cat(
        [torch.zeros(1, dtype=node.dtype), brk, torch.full((1,), node.T, dtype=node.dtype)]
    )
    return gauss_legendre(edges, order)


def _with_rates(node: LinearNODE, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`w, ẇ, b, ḃ` at the times `t`, the rates by one forward-mode pass each."""
    ones = torch.ones_like(t)
    w, wd = jvp(node.w, (t,), (ones,))
    b, bd = jvp(node.b, (t,), (ones,))
    return w, wd, b, bd


def gauge_fixing_regularizer(node: LinearNODE, lam: float = 1.0, *, order: int = 24) -> Tensor:
    """`λ ∫_0^T (‖ẇ + w²‖²_F + ‖ḃ + w b‖²) dt` (eq. 45).

    **Arguments:**

    - `node`: a `LinearNODE`; `node.w`, `node.b` must be differentiable in `t`.
    - `lam`: the weight `λ`.
    - `order`: Gauss-Legendre points per smooth piece (exact for polynomial integrands of
      degree `2 order − 1`).

    **Returns:** a scalar tensor, differentiable with respect to the node's parameters;
    zero exactly on straight-line data paths (`ẍ = 0` for every input).
    """
    t, wq = _grid(node, order)
    w, wd, b, bd = _with_rates(node, t)
    a_w = wd + w @ w
    a_b = bd + (w @ b[..., None])[..., 0]
    density = (a_w**2).sum((-1, -2)) + (a_b**2).sum(-1)
    return lam * (wq * density).sum()


def covariant_higgs_kinetic(node: LinearNODE, lam: float = 1.0, *, order: int = 24) -> Tensor:
    """`λ ∫_0^T ‖(∂_t − w) b‖² dt`, the gauge-covariant kinetic term of footnote 12.

    Invariant under gauge paths `G(t) ∈ SO(d)` with `c = 0` (then
    `(D_t b)' = G⁻¹ D_t b` keeps its norm), not under general `GL(d)` paths.

    **Arguments:** as for `gauge_fixing_regularizer`. **Returns:** a scalar tensor.
    """
    t, wq = _grid(node, order)
    w, _, b, bd = _with_rates(node, t)
    D = bd - (w @ b[..., None])[..., 0]
    return lam * (wq * (D**2).sum(-1)).sum()
