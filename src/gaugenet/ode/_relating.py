"""The gauge transformation relating two equivalent neural ODEs (converse of Theorem 2.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import GaugeError
from ._diffeo import SpatialDiffeo
from ._diffeo_tools import rk4_flow
from ._neural_ode import NeuralODE

__all__ = ["relating_diffeo"]


def relating_diffeo(node_a: NeuralODE, node_b: NeuralODE, *, n_steps: int = 64) -> SpatialDiffeo:
    r"""The gauge transformation relating two equivalent neural ODEs.

    $\varphi_t = \Phi^A_{t\leftarrow 0}\circ(\Phi^B_{t\leftarrow 0})^{-1}$.

    If `node_a` (old) and `node_b` (new) have the same input-output map, then
    `φ_0 = id`, `φ_T = id` on the outputs, and `node_a.pullback(φ)` has the field of
    `node_b`: every pair of equivalent neural ODEs is related by a gauge
    transformation. If the maps differ, `φ_T ≠ id` measures by how much
    (`boundary_error`).

    The flows are integrated with `n_steps` fixed Runge-Kutta steps per unit of time
    (at least one), so that the map is smooth in `(t, x)` and `torch.func` can
    differentiate it for the pullback; the step count sets its accuracy (`O(h⁴)`).

    **Arguments:**

    - `node_a`, `node_b`: neural ODEs with the same `T` and state dimension.
    - `n_steps`: Runge-Kutta steps per unit time.

    **Returns:** a `SpatialDiffeo` with `phi(t, x)` `= Φ^A_{t←0}(Φ^B_{0←t}(x))` and its
    inverse `Φ^B_{t←0}(Φ^A_{0←t}(x))`.
    """
    if abs(node_a.T - node_b.T) > 1e-12 * max(1.0, node_a.T):
        raise GaugeError(f"relating_diffeo: the ODEs end at T = {node_a.T} and T = {node_b.T}")
    T = node_a.T
    steps = max(1, round(n_steps * T))
    field_a, field_b = node_a.field, node_b.field

    def through(first, second, t: Tensor, x: Tensor) -> Tensor:
        # x at time t back to time 0 along `first`, then forward to t along `second`.
        zero = torch.zeros_like(t)
        z = rk4_flow(first, x, t, zero, steps)
        return rk4_flow(second, z, zero, t, steps)

    def phi(t: Tensor, x: Tensor) -> Tensor:
        return through(field_b, field_a, t, x)

    def phi_inverse(t: Tensor, x: Tensor) -> Tensor:
        return through(field_a, field_b, t, x)

    # φ_T = id holds only as far as the two maps agree: boundary_error measures it, so the
    # boundary condition is not enforced here
    return SpatialDiffeo(phi, phi_inverse, T, check_boundary=False)
