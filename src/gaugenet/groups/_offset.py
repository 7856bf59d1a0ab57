"""The offset group of a LayerNorm whose linear readers have no bias.

A LayerNorm over `d` features returns `y = γ ⊙ n + β` with `1ᵀ n = 0`. In coordinates
normalized by the gain, a reader sees `W y = W̃ (n + β̃)` with `W̃ = W diag(γ)` and
`β̃ = β / γ`. Every `g = I + c 1ᵀ` (`c ∈ R^d`, `1 + 1ᵀc > 0`) fixes each `n ⊥ 1`
(`g n = n + c (1ᵀ n) = n`), so

    W̃ ↦ W̃ g,    β̃ ↦ g⁻¹ β̃,    g⁻¹ = I − c 1ᵀ / (1 + 1ᵀc)

changes no reader's output: `W̃ g (n + g⁻¹ β̃) = W̃ n + W̃ β̃`. A reader with a bias may
instead keep `W` and take the change of `W β` back in its bias (`b ↦ b − W (β' − β)`);
rows that feed softmax keys need neither (a constant on every key changes no softmax).
The group is `d`-dimensional and not commutative: `g_a g_b = I + (a (1 + 1ᵀb) + b) 1ᵀ`.
It acts by matrices on the right, so `act(act(s, a), b) = act(s, compose(a, b))` holds with
`compose(a, b) = a (1 + 1ᵀb) + b`. `1 + 1ᵀc > 0` keeps the sign of `1ᵀ β̃` (the identity
component); a translation `β̃ ↦ β̃ + v` would only be a local action (undefined where the
new `1ᵀ β̃` vanishes).

Element: `c`, `(d,)`. Algebra: `x ∈ R^d` (the matrix `x 1ᵀ`, whose square is `(1ᵀx) x 1ᵀ`),
`exp(x) = x · expm1(1ᵀx) / (1ᵀx)`, so that `1 + 1ᵀ exp(x) = e^{1ᵀx} > 0`.

How it meets other factors: in `W̃, β̃` coordinates the LayerNorm's own rescalings (of `γ`
and `β` with the readers' columns) change nothing, and transformations of the readers' rows
act on the left while `g` acts on the right, so both commute with it. A rotation `Q` of the
stream the LayerNorm reads (`Q 1 = 1`; `W̃ ↦ W̃ Q`, `β̃ ↦ Qᵀ β̃`) does not: `Qᵀ g_c Q =
g_{Qᵀc}`, so the offset `c` followed by the rotation `Q` equals `Q` followed by `Qᵀ c`,
declared in `moved_by` as `(rotation, "T")`. The factor acts after the matrix factors
(with the translations), and `GaugeGroup` composes it accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ._base import AbstractFactor, State
from ._canonical_hooks import register_canonicalizer

__all__ = ["LayerNormOffsetFactor", "OffsetSlot", "OffsetTerm"]


def _pad_rows(delta: Tensor, start: int, total: int) -> Tensor:
    """`delta` at rows `start:` of zeros with `total` rows (out of place, for `torch.func`)."""
    shape = delta.shape[1:]
    before = delta.new_zeros(start, *shape)
    after = delta.new_zeros(total - start - delta.shape[0], *shape)
    return torch.cat([before, delta, after])


@dataclass(frozen=True)
class OffsetSlot:
    """Outputs `[start, stop)` of a reader `weight` (`(rows, d)` with `out_axis = 0`, as
    `nn.Linear`; `(d, rows)` with `out_axis = 1`, as an `addmm` weight).

    `mode = "right"`: the rows turn, `W̃ ↦ W̃ g` (a reader without a bias); `"bias"`: the
    rows stay and `bias[start:stop] −= W (β' − β)` takes the change back."""

    weight: str
    bias: str | None
    start: int
    stop: int
    out_axis: int = 0
    mode: Literal["right", "bias"] = "right"

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class OffsetTerm:
    """The action of `g = I + c 1ᵀ` on the LayerNorm `ln` (its `β`; `γ` is read, `1`
    without a weight) and on every reader slot."""

    ln: str
    features: int
    weight: bool
    slots: tuple[OffsetSlot, ...]
    #: `γ` is read as `weight + gain_offset` (a gain stored with an offset)
    gain_offset: float = 0.0

    def gain(self, state: State, dtype: torch.dtype) -> Tensor:
        if self.weight:
            return state[f"{self.ln}.weight"].to(dtype) + self.gain_offset
        return torch.ones(self.features, dtype=dtype)

    def __call__(self, new: State, c: Tensor) -> None:
        beta = new[f"{self.ln}.bias"]
        dtype = beta.dtype
        c = c.to(dtype)
        gamma = self.gain(new, dtype)
        bt = beta / gamma
        moved = bt - c * bt.sum() / (1 + c.sum())  # g⁻¹ β̃
        new_beta = gamma * moved
        delta = new_beta - beta
        for s in self.slots:
            W = new[s.weight]
            rows = (W if s.out_axis == 0 else W.T)[s.start : s.stop]
            if s.mode == "right":  # W̃ ↦ W̃ + (W̃ c) 1ᵀ, i.e. W ↦ W + (W (γ ⊙ c)) (1/γ)ᵀ
                change = (rows @ (gamma * c))[:, None] / gamma[None, :]
                n_rows = W.shape[0] if s.out_axis == 0 else W.shape[1]
                full = _pad_rows(change, s.start, n_rows)
                new[s.weight] = W + (full if s.out_axis == 0 else full.T)
            else:
                b = new[s.bias]
                new[s.bias] = b - _pad_rows(rows @ delta, s.start, b.shape[0])
        new[f"{self.ln}.bias"] = new_beta

    def touched(self) -> tuple[str, ...]:
        out = [f"{self.ln}.bias"]
        if self.weight:
            out.append(f"{self.ln}.weight")
        for s in self.slots:
            out.append(s.weight)
            if s.mode == "bias" and s.bias is not None:
                out.append(s.bias)
        return tuple(dict.fromkeys(out))


@dataclass(eq=False)
class LayerNormOffsetFactor(AbstractFactor):
    """`{I + c 1ᵀ : 1 + 1ᵀc > 0}` acting on one LayerNorm's `β` and its readers (see the
    module docstring). Element: `c`, `(d,)`.

    `moved_by`: `(factor_name, mode)` pairs, as for `TranslationFactor`: the offset `c`
    followed by that factor's element `Q` equals `Q` followed by the offset `M(Q) c`
    (`mode "T"`: `Qᵀ c`, a rotation of the stream the LayerNorm reads)."""

    d: int = 0
    terms: tuple[OffsetTerm, ...] = field(default=(), kw_only=True)
    moved_by: tuple[tuple, ...] = field(default=(), kw_only=True)

    #: acts after the matrix factors, with the translations (see `GaugeGroup.continuous`)
    acts_last = True

    def __post_init__(self) -> None:
        self.kind = "offset"

    @property
    def dim(self) -> int:
        return self.d

    @property
    def offset(self) -> OffsetTerm:
        return self.terms[0]

    def identity(self, dtype=torch.float64) -> Tensor:
        return torch.zeros(self.d, dtype=dtype)

    def sample(self, generator=None, dtype=torch.float64, scale=0.5) -> Tensor:
        xi = scale * torch.randn(self.d, generator=generator, dtype=torch.float64)
        return self.exp(xi / self.d**0.5).to(dtype)

    def exp(self, xi: Tensor) -> Tensor:
        s = xi.sum()
        # expm1(s) / s, continued by 1 at s = 0 (a smooth function, also under jacfwd)
        small = s.abs() < 1e-8
        safe = torch.where(small, torch.ones_like(s), s)
        ratio = torch.where(small, 1 + s / 2, torch.expm1(safe) / safe)
        return xi * ratio

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return a * (1 + b.sum()) + b

    def inverse(self, a: Tensor) -> Tensor:
        self.validate(a)
        return -a / (1 + a.sum())

    def validate(self, a: Tensor) -> None:
        if a.shape != (self.d,):
            raise self._fail(f"expected an offset of shape ({self.d},), got {tuple(a.shape)}")
        self._check_finite(a)
        t = float(1 + a.detach().double().sum())
        if not t > 0:
            raise self._fail(
                f"1 + sum(c) = {t:.6g}: the element I + c 1ᵀ must have 1 + 1ᵀc > 0 (it is "
                "singular at 0, and below 0 it flips the sign of the LayerNorm's Σ β/γ)"
            )

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms for p in t.touched()))

    def canonical_element(self, state: State) -> Tensor:
        """The offset making `β̃ = β / γ` equal to `σ 1`, `σ = sign(1ᵀ β̃)`: the orbit of `β̃`
        is every vector whose entries sum to the same sign, and `σ 1` is the one point of it
        that the stream rotations (`Q 1 = 1`) and the LayerNorm's rescalings also leave
        alone. `c = (β̃ − σ 1) / (σ d)`, with `1 + 1ᵀc = |1ᵀ β̃| / d`."""
        t = self.offset
        beta = state[f"{t.ln}.bias"].double()
        bt = beta / t.gain(state, torch.float64)
        s = float(bt.sum())
        if s == 0:
            raise self._fail("Σ β/γ = 0: the offset has no canonical point (β̃ ⊥ 1)")
        sigma = 1.0 if s > 0 else -1.0
        return ((bt - sigma) / (sigma * self.d)).to(state[f"{t.ln}.bias"].dtype)


def _canonical(f: LayerNormOffsetFactor, state: State) -> Tensor:
    return f.canonical_element(state)


register_canonicalizer(LayerNormOffsetFactor, _canonical)
