"""From the integrated cubic neural ODE to an attention layer (eq. 41), and the gauge
correspondence at the end of Sec. 4.2."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._errors import GaugeError
from ._wilson import wilson_line

__all__ = [
    "alpha_redundancy",
    "attention_from_cubic",
    "attention_layer_from_cubic",
    "cubic_gauge_transform",
]

Field = Callable[[Tensor], Tensor]


def attention_from_cubic(
    w: Field, lam_vec: Tensor, lam_tilde: Tensor, t0: float, T: float, *, holonomy_tol: float = 1e-8
) -> tuple[Tensor, Tensor, Tensor]:
    """`(W_q, W_k, W_v)` of eq. (41), each `(d, d)` in the paper's orientation (`x W`):

    `W_q = W_{t₀:0}ᵀ`, `W_k = (λ̃ W_{t₀:0})ᵀ`, `W_v = (W_{0:t₀} λ W_{t₀:0})ᵀ`,

    so that `x(T) = x(0) + Σ_m (x W_q)_m (x W_k)_m (x W_v) + O(λ²)`; for `n` tokens the same
    matrices give `X_I(T) = X_I + Σ_J (X_I W_q)·(X_J W_k) X_J W_v + O(λ²)` (eq. 42).

    Raises `GaugeError` unless the holonomy `W_{T:0}` is the identity (to `holonomy_tol`).
    """
    d = lam_vec.shape[-1]
    if lam_vec.shape != (d, d) or lam_tilde.shape != (d, d):
        raise GaugeError(
            f"attention_from_cubic: λ and λ̃ must be (d, d), got "
            f"{tuple(lam_vec.shape)} and {tuple(lam_tilde.shape)}"
        )
    if not 0 < t0 < T:
        raise GaugeError(f"attention_from_cubic: t0={t0} must lie inside (0, T={T})")
    hol = wilson_line(w, T, 0.0)
    gap = float((hol - torch.eye(d, dtype=hol.dtype)).abs().max())
    if gap > holonomy_tol:
        raise GaugeError(
            f"attention_from_cubic: eq. (41) needs W_(T:0) = 1; the holonomy differs "
            f"from the identity by {gap:.3e}"
        )
    fwd = wilson_line(w, t0, 0.0).to(lam_vec.dtype)
    back = torch.linalg.inv(fwd)
    return fwd.T, (lam_tilde @ fwd).T, (back @ lam_vec @ fwd).T


def attention_layer_from_cubic(w: Field, lam_vec: Tensor, lam_tilde: Tensor, t0: float, T: float):
    """A one-head `gaugenet.nets.SelfAttention` with identity activation and no biases whose
    output plus the residual `x` is the integrated ODE to first order in `λ`. (The layer
    divides scores by `√d`; `W_q` is multiplied by `√d` to undo it.)"""
    from ..nets import SelfAttention

    wq, wk, wv = attention_from_cubic(w, lam_vec, lam_tilde, t0, T)
    d = wq.shape[0]
    layer = SelfAttention(d, 1, d, activation="identity", bias=False, dtype=wq.dtype)
    with torch.no_grad():
        layer.w_q.copy_(wq * math.sqrt(d))
        layer.w_k.copy_(wk)
        layer.w_v.copy_(wv)
        layer.w_o.copy_(torch.eye(d, dtype=wq.dtype))
    return layer


def cubic_gauge_transform(
    w: Field, lam_vec: Tensor, lam_tilde: Tensor, t0: float, G: Field, G_dot: Field
) -> tuple[Field, Tensor, Tensor]:
    """The spatial diffeomorphism `x = G(t) x'` of the instantaneous cubic ODE:
    `w' = G⁻¹ w G − G⁻¹ Ġ`, `λ' = G(t₀)⁻¹ λ G(t₀)`, `λ̃' = G(t₀)ᵀ λ̃ G(t₀)`.

    With `G(0) = G(T) = 1` the flow is unchanged, and `attention_from_cubic` of the new data
    is eq. (37) with `α = 1`: `W_q ↦ W_q A`, `W_k ↦ W_k A⁻ᵀ`, `W_v ↦ W_v`, `A = G(t₀)⁻ᵀ`.

    **Returns:** `(w', λ', λ̃')`.
    """

    def w_new(t: Tensor) -> Tensor:
        g = G(t)
        return torch.linalg.solve(g, w(t) @ g - G_dot(t))

    g0 = G(torch.tensor([t0], dtype=lam_vec.dtype))[0]
    return w_new, torch.linalg.solve(g0, lam_vec @ g0), g0.T @ lam_tilde @ g0


def alpha_redundancy(lam_vec: Tensor, lam_tilde: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """`(λ/α, α λ̃)`: the same `λ ⊗ λ̃`, giving eq. (37)'s `α` part
    (`W_k ↦ α W_k`, `W_v ↦ α⁻¹ W_v`)."""
    if not alpha > 0:
        raise GaugeError(f"alpha_redundancy: α must be positive, got {alpha}")
    return lam_vec / alpha, alpha * lam_tilde
