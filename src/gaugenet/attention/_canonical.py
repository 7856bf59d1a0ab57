"""Gauge fixing of attention (paper footnote 10): balanced SVD form of every head.

Per head, with `W_qk = W_q W_kᵀ = U S Vᵀ` (rank `d_head`), the canonical form is
`W_q = U S^{1/2}`, `W_k = V S^{1/2}`; likewise `W_v = U' S'^{1/2}`, `W_o = S'^{1/2} V'ᵀ` for
`W_vo = W_v W_o = U' S' V'ᵀ`. **Sign convention:** each left singular vector (column of
`U`, `U'`) has its entry of largest magnitude positive, its right partner flipped with it;
with distinct singular values this makes the form unique. With the `α` factor
(positively homogeneous activations) `α` balances the two: `‖W_qk‖_F = ‖W_vo‖_F` per head.
For softmax the key bias, entirely gauge (`key_shift`), is set to zero. Heads are sorted by
the invariant `‖W_qk‖_F ‖W_vo‖_F`, largest first.

Each canonicalizer reads only what the other attention factors leave unchanged, so the
elements may be computed from one state and applied together, or one after another.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..groups import GaugeGroup, register_canonicalizer
from ..groups._base import State
from ..groups._group import Element
from ._factors import (
    AlphaFactor,
    HeadPermFactor,
    KeyShiftFactor,
    QKFactor,
    ValueShiftFactor,
    VOFactor,
)
from ._layout import HeadLayout

__all__ = ["canonical_attention_element"]


def _balanced(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """For per-head `a (H, n, r)`, `b (H, m, r)` of full column rank, the SVD of `a bᵀ`
    through QR: returns `R_a, R_b, u, s, v` with `a bᵀ = (Q_a u) diag(s) (Q_b v)ᵀ` and
    the sign convention applied to `U = Q_a u`."""
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b)
    u, s, vh = torch.linalg.svd(ra @ rb.transpose(-1, -2))
    v = vh.transpose(-1, -2)
    big = qa @ u  # (H, n, r): the left singular vectors in full space
    idx = big.abs().argmax(-2, keepdim=True)
    sign = torch.sign(torch.gather(big, -2, idx))  # (H, 1, r)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return ra, rb, u * sign, s, v * sign


def _alpha_star(lay: HeadLayout, state: State) -> Tensor:
    """`α` per head bringing `‖W_qk‖_F` and `‖W_vo‖_F` to their geometric mean."""
    n_qk = torch.linalg.matrix_norm(lay.qk(state))
    n_vo = torch.linalg.matrix_norm(lay.vo(state))
    return torch.sqrt(n_vo / n_qk)


def _qk_element(f: QKFactor, state: State) -> Tensor:
    lay = f.layout
    wq, wk = lay.proj(state, "q").double(), lay.proj(state, "k").double()
    rq, _, u, s, _ = _balanced(wq, wk)
    if f.homogeneous:
        s = s * _alpha_star(lay, state).double().unsqueeze(-1)
    # W_q A = Q_q u s^{1/2}  =>  A = R_q⁻¹ u s^{1/2}
    return torch.linalg.solve(rq, u * s.sqrt().unsqueeze(-2))


def _vo_element(f: VOFactor, state: State) -> Tensor:
    lay = f.layout
    wv, wo_t = lay.proj(state, "v").double(), lay.out(state).double().transpose(-1, -2)
    _, ro, _, s, v = _balanced(wv, wo_t)
    if f.homogeneous:
        s = s / _alpha_star(lay, state).double().unsqueeze(-1)
    # C⁻¹ W_o = s^{1/2} Vᵀ with W_o = R_oᵀ Q_oᵀ  =>  C = R_oᵀ v s^{-1/2}
    return ro.transpose(-1, -2) @ v * s.rsqrt().unsqueeze(-2)


def _alpha_element(f: AlphaFactor, state: State) -> Tensor:
    return _alpha_star(f.layout, state).double()


def _shift_element(f: KeyShiftFactor, state: State) -> Tensor:
    """Zero key bias; a factor found from the graph has no layout: its term says which
    entries it shifts (the unrotated part of rotary heads)."""
    if f.layout is None:
        return -f.terms[0].entries(state).double()
    return -f.layout.bias(state, "k").double().reshape(-1)


def _value_shift_element(f: ValueShiftFactor, state: State) -> Tensor:
    """Zero value bias (the output bias absorbs it); `state` must already carry the `vo`
    element, which acts first. A factor found from the graph has no layout: its term
    says where the value bias lies (strided for heads packed per head)."""
    if f.layout is None:
        return -f.terms[0].entries(state, f.n).double()
    return -f.layout.bias(state, "v").double().reshape(-1)


def _perm_element(f: HeadPermFactor, state: State) -> Tensor:
    lay = f.layout
    key = torch.linalg.matrix_norm(lay.qk(state).double()) * torch.linalg.matrix_norm(
        lay.vo(state).double()
    )
    return torch.argsort(key, descending=True, stable=True)


for _t, _fn in (
    (QKFactor, _qk_element),
    (VOFactor, _vo_element),
    (AlphaFactor, _alpha_element),
    (KeyShiftFactor, _shift_element),
    (ValueShiftFactor, _value_shift_element),
    (HeadPermFactor, _perm_element),
):
    register_canonicalizer(_t, _fn)

_CANON = {
    QKFactor: _qk_element,
    VOFactor: _vo_element,
    AlphaFactor: _alpha_element,
    KeyShiftFactor: _shift_element,
    ValueShiftFactor: _value_shift_element,
    HeadPermFactor: _perm_element,
}


def canonical_attention_element(group: GaugeGroup, state: State) -> Element:
    """The element of `group`'s attention factors that brings `state` to canonical form
    (other factors: identity). Elements are float64."""
    out = {}
    # in the order the group acts (the value shift reads the state after `vo`)
    for f in [*group.continuous, *group.discrete]:
        fn = _CANON.get(type(f))
        if fn is not None:
            out[f.name] = fn(f, state)
            if not f.discrete:
                state = f.apply(state, out[f.name].to(next(iter(state.values())).dtype))
    return out
