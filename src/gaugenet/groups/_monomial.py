"""Rescalings constrained by linear equations on their log-scales: products and powers.

Where a computation multiplies two rescaled tensors (a gated MLP's `relu(x W_g) ⊙ x W_u`),
raises one to a power (`x²`, `rsqrt(·)`), or reuses a weight (ties), the log-scales `u` of
the scale classes involved must satisfy integer (or rational) linear equations `A u = 0`.
The rescalings allowed are `u = B z`, `B` (`m × k`) a basis of the null space of `A`, and
every parameter entry scales by `exp(e · B z)` for its exponent row `e` over the classes:
a monomial in the scales `exp(z)`.

The factor's element is `z` (`(k,)`, the additive group `R^k`). Its terms (`Scale`,
`BatchNormShift`) index `α = exp(B z)` extended by a one (index `m`: unscaled), as in
`RescalingFactor`, so the same terms act. Canonical form: `z` minimizing
`Σ_p ‖W_p ⊙ exp(E_p B z)‖²` (convex in `z`), by Newton's method.

Example (ReGLU, `down(relu(gate(x)) ⊙ up(x))`, hidden size `h`): classes `g` (gate rows),
`v` (up rows) and `p` (the product, down's columns) with `p = g + v`; `B` spans `(g, v)`
freely, `k = 2h`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._canonical_hooks import register_canonicalizer
from ._rescaling import Scale
from ._translation import AdditiveFactor

__all__ = ["MonomialScaleFactor"]


@dataclass(eq=False)
class MonomialScaleFactor(AdditiveFactor):
    """`R^k`: rescalings `α = exp(B z)` of `m` scale classes tied by linear equations.

    - element: `z`, `(k,)`;
    - `basis`: `B`, `(m, k)` (integer-valued where discovery solved it exactly);
    - `terms`: `Scale` / `BatchNormShift` terms indexing `α` extended by a one (index `m`:
      unscaled); other terms (a tied weight's alias) receive the same extended `α`.
    """

    basis: Tensor = field(default_factory=lambda: torch.zeros(0, 0), kw_only=True)
    terms: tuple = field(default=(), kw_only=True)
    #: scale class labels (e.g. "scale:gate[3]") for messages; optional
    labels: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "rescaling"

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    def scales(self, z: Tensor) -> Tensor:
        """`α = exp(B z)`, `(m,)`."""
        return torch.exp(self.basis.to(device=z.device, dtype=z.dtype) @ z)

    def _term_input(self, a: Tensor) -> Tensor:
        alpha = self.scales(a)
        return torch.cat([alpha, torch.ones(1, dtype=alpha.dtype, device=alpha.device)])

    def params(self) -> tuple[str, ...]:
        out: list[str] = []
        for t in self.terms:
            if isinstance(t, Scale):
                out.append(t.param)
            elif hasattr(t, "source"):
                out += [t.source, t.alias]
            else:
                out += [t.weight, t.bias]
        return tuple(dict.fromkeys(out))


def canonical_monomial(f: MonomialScaleFactor, state: dict[str, Tensor]) -> Tensor:
    """The balanced gauge: `z` minimizing the squared norm of the scaled parameters (convex
    in `z`), by Newton's method."""
    scaled = [
        (t.value(state[t.param].double()), t.index, t.power)
        for t in f.terms
        if isinstance(t, Scale)
    ]
    m = f.basis.shape[0]
    basis = f.basis.double()

    def cost(z: Tensor) -> Tensor:
        alpha = torch.cat([torch.exp(basis @ z), torch.ones(1, dtype=z.dtype)])
        return sum(((p * alpha[i] ** q) ** 2).sum() for p, i, q in scaled if (i < m).any())

    z = torch.zeros(f.dim, dtype=torch.float64)
    for _ in range(50):
        g = torch.func.grad(cost)(z)
        H = torch.func.hessian(cost)(z)
        # a direction no parameter feels (zero curvature) is left where it is
        step = torch.linalg.lstsq(H, g[:, None]).solution[:, 0]
        z = z - step
        if float(step.abs().max()) < 1e-14 * max(1.0, float(z.abs().max())):
            break
    return z.to(next(iter(state.values())).dtype)


register_canonicalizer(MonomialScaleFactor, canonical_monomial)
