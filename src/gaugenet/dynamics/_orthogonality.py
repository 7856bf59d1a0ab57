"""Gradients are orthogonal to gauge orbits: training moves only across orbits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..groups import GaugeGroup

__all__ = ["orthogonality"]


def orthogonality(
    model: nn.Module, group: GaugeGroup, loss: Callable[[nn.Module], Tensor]
) -> Tensor:
    """The cosine between the loss gradient and every orbit tangent at `model`.

    If the loss is gauge invariant, `L(act(θ, exp(s ξ))) = L(θ)` for all `s`, so its
    derivative at `s = 0`, `⟨∇L, t_ξ⟩`, vanishes for every tangent `t_ξ`: the cosines are
    zero up to rounding.

    **Arguments:**

    - `model`: the network; its parameters receive no gradient (a copy is differentiated).
    - `group`: its gauge group; the tangents are `group.tangent(model)`.
    - `loss`: maps the model to a scalar loss, e.g. `lambda m: F.cross_entropy(m(x), y)`.

    **Returns:** `(group.dim,)` cosines `⟨∇L, t_k⟩ / (‖∇L‖ ‖t_k‖)`, one per Lie-algebra basis
    direction (`0` where a tangent vanishes).
    """
    params = [p for p in model.parameters()]
    value = loss(model)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    g = torch.cat(
        [
            (gr if gr is not None else torch.zeros_like(p)).reshape(-1)
            for gr, p in zip(grads, params)
        ]
    ).detach()
    T = group.tangent(model).to(g.dtype)
    norms = T.norm(dim=1) * g.norm()
    return torch.where(norms > 0, (T @ g) / norms.clamp_min(1e-300), torch.zeros_like(norms))
