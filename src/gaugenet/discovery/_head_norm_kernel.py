"""The kernel of a normalization of each head's queries or keys, seen by the projection rows
that feed it.

A per-head LayerNorm on the queries (or keys), `LN(y_h) = γ ⊙ (y_h − mean y_h)/std + β`
with `y_h = W_h x + b_h` the projection rows of head `h`, removes every constant along `1`
from `y_h`, token by token. So

    W_h ↦ W_h + u aᵀ,    b_h ↦ b_h + a₀ u        (a ∈ R^in, a₀ ∈ R, u = 1)

changes no output: each token's `y_h` moves by `u (aᵀ x + a₀)`, a multiple of `u`. Nothing
here assumes a LayerNorm: the rows of each block and the vector `u` are measured on the map
from the projection's output to the normalization's output (`measure_blocks`).

When the projection reads a LayerNorm's output `x = γ' ⊙ n + β'` (`1ᵀ n = 0`), the row
change is written in the coordinates of `n`: `W_h ↦ W_h + u (a / γ')ᵀ`,
`b_h ↦ b_h + u (a₀ − aᵀ (β' / γ'))`, so that `y_h` moves by `u (aᵀ n + a₀)`. In those
coordinates the action commutes with that LayerNorm's rescalings (of `γ', β'` with the
projection's columns) and with the shift of `β'` into the readers' biases; and `a ∝ 1` is
then the LayerNorm's own kernel `1/γ'` in these rows, which the LayerNorm's kernel factor
already holds where it covers them: there `a` is taken in `1^⊥` (`complement`).

A projection without a bias that reads a LayerNorm with `β'` may also be turned on the right
by that LayerNorm's offset group (`W̃ ↦ W̃ g`, `β̃ ↦ g⁻¹ β̃` with `W̃ = W diag(γ')`,
`β̃ = β'/γ'`, `g = I + c 1ᵀ`, `groups/_offset.py`). The row change is then written so that
it commutes with `g` (`offset = True`): `W̃_h ↦ W̃_h + u φᵀ` with

    φ = Pᵀ a + t 1 / (1ᵀ β̃),    P = I − β̃ 1ᵀ / (1ᵀ β̃),    a = B z ∈ 1^⊥,

since `P(g⁻¹ β̃) = P(β̃) g` and `gᵀ 1 = (1 + 1ᵀc) 1` with `1ᵀ g⁻¹ β̃ = 1ᵀ β̃ / (1 + 1ᵀc)`;
`φ` still spans `R^in` (`Pᵀ` maps `1^⊥` onto `β̃^⊥`, and `1 ∉ β̃^⊥` where `1ᵀ β̃ ≠ 0`). A
rotation `Q` of the stream (`Q 1 = 1`, `W̃ ↦ W̃ Q`, `β̃ ↦ Qᵀ β̃`) moves `z` by `Bᵀ Qᵀ B` and
keeps `t` (declared by `_head_norm_link.py`). The element of a block is `z` (`features − 1`)
and `t` (left out where the LayerNorm's kernel holds the block).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..groups import TranslationFactor
from ..groups._base import State
from ..groups._orthogonal import complement_basis

__all__ = ["HeadNormKernel", "HeadNormKernelFactor"]


@dataclass(frozen=True)
class HeadNormKernel:
    """`W[rows_k] += u_k aᵀ`, `b[rows_k] += a₀ u_k` for every block `k` (module docstring).

    - `weight`, `bias`: the projection (`bias` may be `None`); `out_axis`: the weight axis
      over outputs (0 for `nn.Linear`, 1 for an `addmm` weight `(in, out)`).
    - `rows`: `(k, m)` long, the projection rows of each block; `u`: `(k, m)` its kernel
      vector.
    - `features`: the projection's inputs.
    - `ln`: the LayerNorm whose output the projection reads (its coordinates are used), or
      `None`; `ln_weight`, `ln_bias`: whether it has `γ'`, `β'`; `ln_offset`: `γ'` is read as
      `weight + ln_offset`.
    - `complement`: `(k,)` bool, the blocks whose `a` is taken in `1^⊥` (`features − 1`
      coordinates).
    """

    weight: str
    bias: str | None
    out_axis: int
    rows: Tensor
    u: Tensor
    features: int
    ln: str | None = None
    ln_weight: bool = False
    ln_bias: bool = False
    ln_offset: float = 0.0
    complement: Tensor | None = None
    #: written to commute with the LayerNorm's offset group (module docstring; no bias)
    offset: bool = False

    def sizes(self) -> list[int]:
        """Entries of the element per block."""
        comp = self._complement()
        extra = 1 if self.bias is not None else 0
        return [self.features - int(c) + extra for c in comp.tolist()]

    def starts(self) -> list[int]:
        """Where each block's entries start in the element."""
        sizes = self.sizes()
        return [sum(sizes[:k]) for k in range(len(sizes))]

    def _complement(self) -> Tensor:
        k = int(self.rows.shape[0])
        return self.complement if self.complement is not None else torch.zeros(k, dtype=bool)

    def _coordinates(self, state: State, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`(1/γ', β'/γ')` `(features,)` of the LayerNorm read (ones and zeros without one)."""
        ones = torch.ones(self.features, dtype=dtype)
        if self.ln is None:
            return ones, ones * 0
        gamma = state[f"{self.ln}.weight"].to(dtype) + self.ln_offset if self.ln_weight else ones
        beta = state[f"{self.ln}.bias"].to(dtype) if self.ln_bias else ones * 0
        return 1 / gamma, beta / gamma

    def __call__(self, new: State, v: Tensor) -> None:
        W = new[self.weight]
        dtype = W.dtype
        inv, shift = self._coordinates(new, dtype)
        v = v.to(dtype)
        rows = W if self.out_axis == 0 else W.T
        delta = torch.zeros_like(rows)
        db = torch.zeros(rows.shape[0], dtype=dtype)
        basis = complement_basis(self.features, dtype)
        k0 = 0
        for k, (size, comp) in enumerate(zip(self.sizes(), self._complement().tolist())):
            part = v[k0 : k0 + size]
            k0 += size
            n = self.features - int(comp)
            if self.offset:  # `φ = Pᵀ B z + t 1 / (1ᵀ β̃)`
                z = basis @ part[: self.features - 1]
                t = part.new_zeros(()) if comp else part[-1]
                a = z - (shift @ z - t) / shift.sum()
            else:
                a = basis @ part[:n] if comp else part[:n]
            a0 = part[n] if self.bias is not None else part.new_zeros(())
            u = self.u[k].to(dtype)
            r = self.rows[k]
            delta = delta.index_add(0, r, u[:, None] * (a * inv)[None, :])
            db = db.index_add(0, r, u * (a0 - a @ shift))
        new[self.weight] = rows + delta if self.out_axis == 0 else (rows + delta).T
        if self.bias is not None:
            new[self.bias] = new[self.bias] + db.to(new[self.bias].dtype)

    def touched(self) -> tuple[str, ...]:
        out = [self.weight, *([self.bias] if self.bias is not None else [])]
        if self.ln is not None:
            out += [f"{self.ln}.weight"] * self.ln_weight + [f"{self.ln}.bias"] * self.ln_bias
        return tuple(out)


@dataclass(eq=False)
class HeadNormKernelFactor(TranslationFactor):
    """`R^n`: the kernel of a per-head normalization in its projection's rows."""

    terms: tuple[HeadNormKernel, ...] = field(default=(), kw_only=True)

    @property
    def kernel(self) -> HeadNormKernel:
        return self.terms[0]

    def params(self) -> tuple[str, ...]:
        return self.kernel.touched()
