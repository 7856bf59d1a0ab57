"""LayerNorms whose `eps` is too small to see: `LN(c x) = LN(x)` up to `eps`, so a change of
the parameters that only scales what a LayerNorm reads is a symmetry up to `eps`, under the
rank tolerance, and discovery (which proves exact symmetries) rightly does not offer it.

Constructed from the model, not from names: for a LayerNorm `L` with input `x_L(θ)` (rows
`x_r` over its normalized axes), the tangents `t = K c`, sought in the numerical `ker J`
(orthonormal `K`, where they must lie), solve

    J_cut t = 0   and   J_x t = (α_r x_r)_r   for some scales α ≠ 0,

where `J_x = ∂x_L/∂θ` and `J_cut` is the Jacobian of the outputs with `L`'s input held fixed
(every path that does not pass through `L`): each row of the norm's input is scaled, and
nothing else changes. All rows alike is the usual case (everything feeding a post-norm
residual sum scaled); a row value that only one parameter entry makes (a token that only
occurs at one position) can be scaled alone. Rows with equal values share one scale. The
solutions are the null space of `[J_cut K, 0; J_x K, −X]`; kernel directions with `α = 0`
(other redundancy) are projected out, so nothing else is carried along. Each is kept when
`‖J t‖ ≤ rtol σ_max ‖t‖`: `J t` is then the change of the outputs when the rows are
scaled, of order `eps / σ²`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._attribute import CauseSpace, span
from ._causes import small_eps_norms
from ._hooked import hooked_jacobian, module_inputs
from ._jacobian import FlatModel
from ._svd import svd

__all__ = ["eps_cause"]

#: singular values of the system under this share of the largest count as zero
_CUT = 1e-8
#: at most this many distinct input rows get a scale of their own (else one for all)
_MAX_ROWS = 2048


def _row_scalings(x: Tensor, width: int) -> Tensor:
    """`(n_in, r)`: the input `x` `(n_in,)` of a norm over its last `width` entries, split
    into one column per distinct row value (that row's entries where it occurs, 0
    elsewhere); one column `x` when the distinct rows are too many."""
    rows = x.reshape(-1, width)
    distinct, which = torch.unique(rows, dim=0, return_inverse=True)
    if len(distinct) > _MAX_ROWS:
        return x[:, None]
    out = torch.zeros(rows.shape[0], width, len(distinct), dtype=x.dtype)
    out[torch.arange(rows.shape[0]), :, which] = rows
    return out.reshape(-1, len(distinct))


def _scaling_tangents(fm: FlatModel, norm: nn.LayerNorm, kernel: Tensor) -> Tensor:
    """`(n_params, j)`: an orthonormal basis of the directions `t = K c` of `ker J`
    (orthonormal `kernel` `K` `(n_params, k)`) that scale the rows of the input of `norm`,
    each distinct row by a factor `α_r` not all zero, and change nothing else:
    `[J_cut K, 0; J_x K, −X] (c, α) = 0` (see the module). Kernel directions that do not
    scale the input (`α = 0`) are projected out."""

    def cut(mod: nn.Module, call: int, x: Tensor) -> Tensor:
        return x.detach()

    with torch.no_grad():
        x = module_inputs(fm, norm, fm.theta)
    width = math.prod(norm.normalized_shape)
    scalings = _row_scalings(x, width)
    a = hooked_jacobian(fm, {norm: cut}, kernel, watch=norm)  # rows: J_cut K, then J_x K
    rhs = torch.cat([torch.zeros(a.shape[0] - len(x), scalings.shape[1], dtype=x.dtype), scalings])
    system = torch.cat([a, -rhs], 1)
    if system.shape[0] > system.shape[1]:  # tall: the same singular values from R, cheaper
        system = torch.linalg.qr(system, mode="r").R
    _, s, vh = svd(system, full_matrices=True)
    null = vh[int((s > _CUT * s[0]).sum()) :].T  # (k + r, m)
    k = kernel.shape[1]
    _, s_alpha, vh_alpha = svd(null[k:], full_matrices=False)
    scaling = null[:k] @ vh_alpha[: int((s_alpha > 1e-6).sum())].T  # α ≠ 0 combinations
    return span(kernel @ scaling, 1e-6)


def eps_cause(fm: FlatModel, jac: Tensor, kernel: Tensor, floor: float) -> CauseSpace:
    """The `CauseSpace` of the LayerNorms of `fm.model` whose `eps` the Jacobian does not
    see: the scaling tangents of each norm, sought in `ker J` (orthonormal `kernel`
    `(n_params, k)` of `jac` `(n_outputs, n_params)`), kept when they are constructed and
    `J t` is under `floor` (`rtol σ_max`). Every LayerNorm is tried, not only those whose
    `eps` is under the rank tolerance times their inputs' variance: what the outputs see of
    a scaling is `eps / σ²` times how much they depend on that norm's input, which can be
    small (a table of relative positions read through a few score terms); the test on
    `J t` decides."""
    dirs, where = [], []
    for name in small_eps_norms(fm.model, fm.args, math.inf):
        t = _scaling_tangents(fm, fm.model.get_submodule(name), kernel)
        t = t[:, (jac @ t).norm(dim=0) <= floor]  # in ker J to the rank tolerance
        if t.shape[1]:
            dirs.append(t)
            where.append(name)
    n = fm.theta.numel()
    d = torch.cat(dirs, 1) if dirs else torch.zeros(n, 0, dtype=jac.dtype)
    return CauseSpace(
        "scaling input rows of a LayerNorm whose eps is under the rank tolerance", tuple(where), d
    )
