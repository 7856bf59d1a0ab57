"""Weight matching of the continuous factors: the element bringing one state closest to a
reference in summed squared distance `Σ_p ‖act(state, g)[p] − reference[p]‖²`.

- `match_rotations`: orthogonal factors (`ResidualRotationFactor`), in closed form
  (orthogonal Procrustes on the complement of `1`), one factor at a time.
- `match_continuous`: every other continuous factor at once (per-head `GL` of attention,
  rescalings, translations), by L-BFGS from the identity on `GL ∋ I + X`, `α = exp(x)`
  and shifts `x`. The result is kept only where it lowers the distance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..groups import Element, GaugeGroup, GLFactor, PermutationFactor
from ..groups._base import State
from ..groups._orthogonal import complement_basis
from ._residual import ResidualRotationFactor

__all__ = ["match_continuous", "match_rotations", "match_stream", "minimize", "state_distance"]


def state_distance(reference: State, state: State, params: set[str] | None = None) -> float:
    """`Σ_p ‖state[p] − reference[p]‖²` over floating entries (all, or `params`)."""
    keys = reference.keys() if params is None else params
    return sum(
        float(((state[k].double() - reference[k].double()) ** 2).sum())
        for k in keys
        if reference[k].is_floating_point()
    )


def _procrustes(f: ResidualRotationFactor, reference: State, state: State) -> Tensor:
    """Every term maps a block `X ↦ Qᵀ X` (for orthogonal `Q`, `Q⁻¹ = Qᵀ`), so the distance
    is `const − 2 tr(Qᵀ M)` with `M = Σ X_b X_aᵀ`; over `Q = 11ᵀ/d + B R Bᵀ` the maximum is
    at `R = U Vᵀ` for `Bᵀ M B = U S Vᵀ`."""
    m = torch.zeros(f.d, f.d, dtype=torch.float64)
    for t in f.terms:
        xb = state[t.param].double().movedim(t.axis, 0).reshape(f.d, -1)
        xa = reference[t.param].double().movedim(t.axis, 0).reshape(f.d, -1)
        m += xb @ xa.T
    b = complement_basis(f.d)
    u, _, vh = torch.linalg.svd(b.T @ m @ b)
    return f.from_rotation(u @ vh)


def match_rotations(group: GaugeGroup, reference: State, state: State) -> Element:
    """The orthogonal factors' elements bringing `state` closest to `reference`."""
    out = {}
    for f in group.factors:
        if isinstance(f, ResidualRotationFactor):
            out[f.name] = _procrustes(f, reference, state)
            state = f.apply(state, out[f.name].to(next(iter(state.values())).dtype))
    return out


def match_stream(
    factor: ResidualRotationFactor | PermutationFactor, reference: Tensor, features: Tensor
) -> Tensor:
    """Activation matching of a residual stream: the rotation (orthogonal Procrustes) or
    the permutation (linear assignment) `g` minimizing `‖features · g − reference‖²`.

    **Arguments:** `reference`, `features`: `(N, d)` activations of the stream of the
    reference model and of the model to move, on the same inputs (rows: samples, tokens,
    layers).

    **Returns:** the factor's element.
    """
    m = features.double().T @ reference.double()
    if isinstance(factor, PermutationFactor):
        _, cols = linear_sum_assignment(m.T.numpy(), maximize=True)  # rows: reference
        return torch.as_tensor(cols, dtype=torch.long)
    b = complement_basis(factor.d)
    u, _, vh = torch.linalg.svd(b.T @ m @ b)
    return factor.from_rotation(u @ vh)


def match_continuous(
    group: GaugeGroup, reference: State, state: State, *, steps: int = 100
) -> Element:
    """The non-orthogonal continuous factors' elements bringing `state` closest to
    `reference` (a local minimum of the squared distance, from the identity)."""
    factors = [
        f for f in group.continuous if not isinstance(f, ResidualRotationFactor) and f.dim > 0
    ]
    if not factors:
        return {}
    touched = {p for f in factors for p in f.params()}
    st = {k: v.double() for k, v in state.items()}
    ref = {p: reference[p].double() for p in touched}
    norm = state_distance(ref, {p: torch.zeros_like(v) for p, v in ref.items()}) or 1.0
    xs = [
        torch.zeros(f.b, f.d, f.d, dtype=torch.float64, requires_grad=True)
        if isinstance(f, GLFactor)
        else torch.zeros(f.dim, dtype=torch.float64, requires_grad=True)
        for f in factors
    ]

    def element() -> Element:
        return {
            f.name: f.identity() + x if isinstance(f, GLFactor) else f.exp(x)
            for f, x in zip(factors, xs)
        }

    def loss() -> Tensor:
        new = group.act_state(st, element(), validate=False)
        return sum(((new[p] - ref[p]) ** 2).sum() for p in touched) / norm

    with torch.no_grad():
        before = float(loss())
    minimize(xs, loss, steps, history_size=50)
    with torch.no_grad():
        after = float(loss())
        g = {k: v.detach() for k, v in element().items()}
    if not after < before or not all(bool(torch.isfinite(v).all()) for v in g.values()):
        return {f.name: f.identity() for f in factors}  # no progress: stay where we are
    return g


def minimize(
    xs: list[Tensor], loss: Callable[[], Tensor], steps: int, history_size: int = 100
) -> None:
    """Lower `loss()` over the tensors `xs` (in place) with at most `steps` L-BFGS
    iterations and a strong-Wolfe line search, to tolerances near float64 rounding."""
    opt = torch.optim.LBFGS(
        xs,
        max_iter=steps,
        history_size=history_size,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        out = loss()
        out.backward()
        return out

    opt.step(closure)
