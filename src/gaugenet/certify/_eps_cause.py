"""LayerNorms whose `eps` is too small to see: `LN(c x) = LN(x)` up to `eps`, so a change of
the parameters that only scales what a LayerNorm reads is a symmetry up to `eps`, under the
rank tolerance, and discovery (which proves exact symmetries) rightly does not offer it.

Constructed from the model, not from names: for a LayerNorm `L` with input `x_L(θ)`, the
tangent `t`, sought in the numerical `ker J` (where it must lie), solves

    J_x t = x_L   (the norm's input is scaled)   and   J_cut t = 0,

where `J_x = ∂x_L/∂θ` and `J_cut` is the Jacobian of the outputs with `L`'s input held fixed
(every path that does not pass through `L`). It exists when everything feeding `L` can be
scaled without touching what else reads it (every branch of a post-norm residual sum, say).
It is kept when the system is solved to `SOLVE_TOL` and `‖J t‖ ≤ rtol σ_max ‖t‖`: `J t` is
then exactly the change of the outputs when `L`'s input is scaled, of order `eps / σ²`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._attribute import CauseSpace
from ._causes import small_eps_norms
from ._hooked import hooked_jacobian, module_inputs
from ._jacobian import FlatModel

__all__ = ["SOLVE_TOL", "eps_cause"]

#: relative residual under which the scaling tangent counts as constructed
SOLVE_TOL = 1e-6
#: singular values of the system under this share of the largest are dropped: the solution
#: takes no part of the (near) kernel, so it cannot carry other missing directions along
_CUT = 1e-8


def _scaling_tangent(fm: FlatModel, norm: nn.Module, kernel: Tensor) -> tuple[Tensor, float]:
    """The least-norm `t` `(n_params,)` in the span of `kernel` `(n_params, k)` (`ker J`)
    scaling the input of `norm` and nothing else (see the module), with the relative
    residual of its system."""

    def cut(mod: nn.Module, call: int, x: Tensor) -> Tensor:
        return x.detach()

    with torch.no_grad():
        x = module_inputs(fm, norm, fm.theta)
    a = hooked_jacobian(fm, {norm: cut}, kernel, watch=norm)  # rows: J_cut, then J_x
    b = torch.cat([torch.zeros(a.shape[0] - len(x), dtype=x.dtype), x])
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    k = int((s > _CUT * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    c = vh[:k].T @ ((u[:, :k].T @ b) / s[:k])
    return kernel @ c, float((a @ c - b).norm() / b.norm().clamp_min(1e-300))


def eps_cause(fm: FlatModel, jac: Tensor, kernel: Tensor, floor: float, rtol: float) -> CauseSpace:
    """The `CauseSpace` of the LayerNorms of `fm.model` whose `eps` is under `rtol` of their
    inputs' variance: one scaling tangent per norm, sought in `ker J` (orthonormal `kernel`
    `(n_params, k)` of `jac` `(n_outputs, n_params)`), kept when it is constructed and
    `J t` is under `floor = rtol σ_max`."""
    dirs, where = [], []
    for name in small_eps_norms(fm.model, fm.args, rtol):
        t, residual = _scaling_tangent(fm, fm.model.get_submodule(name), kernel)
        if residual <= SOLVE_TOL and float((jac @ t).norm()) <= floor * float(t.norm()):
            dirs.append(t)
            where.append(name)
    n = fm.theta.numel()
    d = torch.stack(dirs, 1) if dirs else torch.zeros(n, 0, dtype=jac.dtype)
    return CauseSpace(
        "scaling the input of a LayerNorm whose eps is under the rank tolerance", tuple(where), d
    )
