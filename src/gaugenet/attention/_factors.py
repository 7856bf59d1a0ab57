"""The gauge factors of one attention layer (paper eq. 36-37, and the value-output GL).

Per head `h`, with tokens as rows (`q = x W_q + b_q`, scores `φ(q kᵀ)`):

- `qk`: `W_q ↦ W_q A`, `b_q ↦ b_q A`, `W_k ↦ W_k A⁻ᵀ` (`A ∈ GL(d_head)`, the `α = 1` part
  of eq. 37). For softmax the key bias only adds `q · b_k` to every score of a query, a
  constant over keys that softmax removes, so `b_k` is left to the `key_shift` factor
  (which keeps the two factors commuting); otherwise `b_k ↦ b_k A⁻ᵀ`.
- `vo`: `W_v ↦ W_v C`, `b_v ↦ b_v C`, `W_o ↦ C⁻¹ W_o` (`C ∈ GL(d_v)`), exact for any `φ`.
- `alpha` (positively homogeneous `φ` only): `W_k, b_k ↦ α W_k, α b_k` and
  `W_v, b_v ↦ α⁻¹ W_v, α⁻¹ b_v` (`B = α A⁻¹` in eq. 37).
- `key_shift` (softmax with a key bias): `b_k ↦ b_k + c`, `c ∈ R^{heads·d_head}`.
- `value_shift` (softmax with value and output biases): `b_v ↦ b_v + u`, `b_o ↦ b_o − u W_o`
  (`u ∈ R^{heads·d_v}`): the attention weights of a query sum to one, so a shift of every
  value reaches the output as the constant `u W_o`, which the output bias takes back. It
  acts after `vo` (`u` moves as `b_v` does, `moved_by`).
- `heads`: permutations of the heads, conjugating all of the above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..groups import (
    AbstractFactor,
    GLFactor,
    MatTerm,
    PermTerm,
    PermutationFactor,
    RescalingFactor,
    Scale,
    Shift,
    TranslationFactor,
    shifted_entries,
)
from ..groups._base import State
from ._layout import HeadLayout, Slot

__all__ = [
    "AlphaFactor",
    "HeadPermFactor",
    "KeyShiftFactor",
    "QKFactor",
    "VOFactor",
    "ValueShiftFactor",
    "attention_factors",
]


@dataclass(eq=False)
class QKFactor(GLFactor):
    """Per-head `GL(d_head)` of the query-key pair; `layout` says where the heads live and
    `homogeneous` whether the layer also has the `α` factor (its canonical form balances
    `W_qk` against `W_vo`)."""

    layout: HeadLayout | None = field(default=None, kw_only=True)
    homogeneous: bool = field(default=False, kw_only=True)


@dataclass(eq=False)
class VOFactor(GLFactor):
    """Per-head `GL(d_v)` of the value-output pair."""

    layout: HeadLayout | None = field(default=None, kw_only=True)
    homogeneous: bool = field(default=False, kw_only=True)


@dataclass(eq=False)
class AlphaFactor(AbstractFactor):
    """Per-head `α > 0` of eq. 37 (positively homogeneous activations only).

    It acts like a `RescalingFactor` (same `Scale` terms, same element) but is a type of its
    own: its canonical form balances `W_qk` against `W_vo` (gauge invariants), not the norms
    of the weights as the generic rescaling gauge does.
    """

    n: int = 0
    terms: tuple = field(default=(), kw_only=True)
    labels: tuple[str, ...] = field(default=(), kw_only=True)
    layout: HeadLayout | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "rescaling"

    dim = RescalingFactor.dim
    identity = RescalingFactor.identity
    sample = RescalingFactor.sample
    compose = RescalingFactor.compose
    inverse = RescalingFactor.inverse
    exp = RescalingFactor.exp
    validate = RescalingFactor.validate
    _term_input = RescalingFactor._term_input
    params = RescalingFactor.params


@dataclass(eq=False)
class KeyShiftFactor(TranslationFactor):
    """The key-bias shift of softmax attention."""

    layout: HeadLayout | None = field(default=None, kw_only=True)

    def canonical(self, state: State) -> Tensor:
        """The shift zeroing the key-bias entries it moves: `(n,)`. Every other factor
        acting on those entries maps them linearly to themselves (the query-key `GL` on the
        coordinates the scores do not see, rescalings, head permutations), so the zero
        keeps, and the gauge is the same at every point of the orbit."""
        return -shifted_entries(self.terms[0], state, self.n)


@dataclass(frozen=True)
class ValueBiasShift:
    """`param[offset : offset + n] += u` (the value bias) and `bias −= W_o u`, where `W_o` is
    the block `weight_offset : weight_offset + n` of `weight` along `axis` (its value side).
    With `center`, the compensation is projected off `1` over the outputs (for an output a
    LayerNorm normalizes, which removes that part itself; see `discovery/_centering.py`)."""

    param: str
    offset: int
    weight: str
    axis: int
    weight_offset: int
    bias: str
    center: bool = False
    #: under grouped-query attention each key-value head's value (blocks of `block`
    #: entries) is read by `repeat` query heads, so the output sees it `repeat` times
    repeat: int = 1
    block: int = 0
    #: value blocks (`block` entries each) stored `stride · block` apart in `param` (heads
    #: packed as `[q, k, v]` per head, as GPT-NeoX's `query_key_value`)
    stride: int = 1
    #: the value-bias entries listed, in element order (heads spread over a projection
    #: split into partitions, as CodeGen's); `offset` and `stride` then unused
    rows: tuple[int, ...] | None = None

    def _index(self, n: int) -> Tensor:
        """The entries of `param` the `n` shift entries land on, in element order."""
        if self.rows is not None:
            if len(self.rows) != n:
                raise ValueError(f"value shift on {self.param}: {len(self.rows)} rows for {n}")
            return torch.tensor(self.rows, dtype=torch.long)
        if self.stride == 1:
            return torch.arange(self.offset, self.offset + n)
        step = self.stride * self.block
        idx = self.offset + torch.arange(n // self.block)[:, None] * step + torch.arange(self.block)
        return idx.reshape(-1)

    def entries(self, state: dict[str, Tensor], n: int) -> Tensor:
        """The value-bias entries the shift moves, `(n,)` in element order."""
        return state[self.param][self._index(n)]

    def __call__(self, new: dict[str, Tensor], u: Tensor) -> None:
        p = new[self.param]
        n = u.shape[0]
        u = u.to(p.dtype)
        if self.stride != 1 or self.rows is not None:
            new[self.param] = p.index_add(0, self._index(n), u)
        else:
            new[self.param] = torch.cat(
                [p[: self.offset], p[self.offset : self.offset + n] + u, p[self.offset + n :]]
            )
        if self.repeat > 1:
            u = u.reshape(-1, self.block).repeat_interleave(self.repeat, 0).reshape(-1)
        w = new[self.weight].narrow(self.axis, self.weight_offset, u.shape[0])
        dt = torch.promote_types(w.dtype, u.dtype)  # factors before may have promoted `w`
        change = torch.tensordot(w.to(dt), u.to(dt), dims=([self.axis], [0]))
        if self.center:
            change = change - change.mean()
        new[self.bias] = new[self.bias] - change


@dataclass(eq=False)
class ValueShiftFactor(TranslationFactor):
    """The value-bias shift of softmax attention, absorbed by the output bias."""

    layout: HeadLayout | None = field(default=None, kw_only=True)

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms for p in (t.param, t.weight, t.bias)))

    def canonical(self, state: State) -> Tensor:
        """The shift zeroing the value bias (its image `W_o b_v` moved into the output
        bias): `(n,)`. The value-output `GL` (`b_v ↦ b_v C`), the `α` rescaling and head
        permutations all keep a zero value bias, so the gauge is orbit-independent."""
        return -self.terms[0].entries(state, self.n)


@dataclass(eq=False)
class HeadPermFactor(PermutationFactor):
    """Permutations of the heads of one layer."""

    layout: HeadLayout | None = field(default=None, kw_only=True)


def _head_index(lay: HeadLayout, length: int, offset: int, size: int, axis: int, ndim: int):
    """Integer index along `axis` (broadcastable to a parameter of `ndim` dims): the head of
    each entry, `heads` (meaning "not scaled") outside the heads' block."""
    idx = torch.full((length,), lay.heads, dtype=torch.long)
    idx[offset : offset + lay.heads * size] = torch.arange(lay.heads).repeat_interleave(size)
    shape = [1] * ndim
    shape[axis] = length
    return idx.reshape(shape)


def _entries(lay: HeadLayout, offset: int, size: int) -> torch.Tensor:
    return offset + torch.arange(lay.heads * size).reshape(lay.heads, size)


def attention_factors(
    lay: HeadLayout,
    shapes: dict[str, tuple[int, ...]],
    *,
    softmax: bool,
    homogeneous: bool,
    modules: tuple[str, ...] = (),
    key_shift: bool | None = None,
) -> list:
    """The factors of one attention layer.

    **Arguments:**

    - `lay`: where the heads live.
    - `shapes`: the shapes of the parameters `lay` names.
    - `softmax`: the activation is a softmax over keys (adds `key_shift`).
    - `homogeneous`: the activation is positively homogeneous of degree one (adds `alpha`).
    - `key_shift`: a constant per query added to the scores reaches the softmax unchanged,
      so the key bias may shift and the query-key `GL` leaves it alone (default: `softmax`;
      `False` where an elementwise map of the scores comes first, as soft-capping's `tanh`).

    **Returns:** `[qk, vo, (alpha), (key_shift), heads]`.
    """
    H, dh, dv, ax, oax = lay.heads, lay.head_dim, lay.value_dim, lay.in_axis, lay.out_axis
    q, k, v, o = lay.q, lay.k, lay.v, lay.o

    def mat(slot: Slot, mode: str, *, bias: bool = True) -> list[MatTerm]:
        out = [MatTerm(slot.weight, ax, slot.offset, mode)]
        if bias and slot.bias is not None:
            out.append(MatTerm(slot.bias, 0, slot.bias_offset, mode))
        return out

    key_shift = softmax if key_shift is None else key_shift
    qk_terms = mat(q, "T") + mat(k, "inv", bias=not key_shift)
    vo_terms = [*mat(v, "T"), MatTerm(o.weight, oax, o.offset, "inv")]
    qk = QKFactor(
        lay.name("qk"),
        dh,
        H,
        terms=tuple(qk_terms),
        modules=modules,
        layout=lay,
        homogeneous=homogeneous,
    )
    vo = VOFactor(
        lay.name("vo"),
        dv,
        H,
        terms=tuple(vo_terms),
        modules=modules,
        layout=lay,
        homogeneous=homogeneous,
    )
    factors: list = [qk, vo]
    conj: list = [(qk.name, torch.arange(H)), (vo.name, torch.arange(H))]

    if homogeneous:
        scales = []
        for slot, size, power in ((k, dh, 1), (v, dv, -1)):
            shp = shapes[slot.weight]
            scales.append(
                Scale(
                    slot.weight, _head_index(lay, shp[ax], slot.offset, size, ax, len(shp)), power
                )
            )
            if slot.bias is not None:
                n = shapes[slot.bias][0]
                scales.append(
                    Scale(slot.bias, _head_index(lay, n, slot.bias_offset, size, 0, 1), power)
                )
        alpha = AlphaFactor(
            lay.name("alpha"),
            H,
            terms=tuple(scales),
            modules=modules,
            layout=lay,
            labels=tuple(f"{lay.name('head')}[{h}]" for h in range(H)),
        )
        factors.append(alpha)
        conj.append((alpha.name, torch.arange(H)))
    if key_shift and k.bias is not None:
        shift = KeyShiftFactor(
            lay.name("key_shift"),
            H * dh,
            terms=(Shift(k.bias, k.bias_offset),),
            modules=modules,
            layout=lay,
        )
        factors.append(shift)
        conj.append((shift.name, torch.arange(H * dh).reshape(H, dh)))
    if softmax and v.bias is not None and o.bias is not None:
        vshift = ValueShiftFactor(
            lay.name("value_shift"),
            H * dv,
            terms=(ValueBiasShift(v.bias, v.bias_offset, o.weight, oax, o.offset, o.bias),),
            moved_by=((vo.name, "T"),),
            modules=modules,
            layout=lay,
        )
        factors.append(vshift)
        conj.append((vshift.name, torch.arange(H * dv).reshape(H, dv)))

    perm_terms = []
    for slot, size in ((q, dh), (k, dh), (v, dv)):
        perm_terms.append(PermTerm(slot.weight, ax, _entries(lay, slot.offset, size)))
        if slot.bias is not None:
            perm_terms.append(PermTerm(slot.bias, 0, _entries(lay, slot.bias_offset, size)))
    perm_terms.append(PermTerm(o.weight, oax, _entries(lay, o.offset, dv)))
    factors.append(
        HeadPermFactor(
            lay.name("heads"),
            H,
            terms=tuple(perm_terms),
            conjugates=tuple(conj),
            modules=modules,
            layout=lay,
        )
    )
    return factors
