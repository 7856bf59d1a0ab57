"""The value-row shift with no bias to take it back: the one constant along `1` that the
LayerNorms reading the attention's output remove.

Bias-free value rows reading a LayerNorm take any constant `u` (`_value_row_shift.py`); the
output projection turns it into `W u` at every token (`W`: its columns the values reach,
summed over the query heads of each key-value head). Where no bias takes that back but only
LayerNorms read the projection's output through additions (its `CenteredOutputFactor`,
`_centering.py`), the shift holds for the `u` with `P W u = 0` (`P = I − 11ᵀ/d`): one line
when `W` is square and `P W` has rank `d − 1`.

A translation needs a vector on that line, `W_v[rows] += (t/s) V (1/γ)ᵀ`, and every other
factor must move it as the group composes. `W u = 1` would fix one, but the centered-output
factor (`W ↦ W + 1 aᵀ`) scales it by `1 / (1 + aᵀ u)`. Instead `V` is built from `P W` and
the value rows in `1^⊥` only:

    V = σ n / √ν,    ν = Σ_h n_hᵀ G_h⁻¹ n_h,    G_h = W̃_h P W̃_hᵀ,

with `n` a unit vector spanning `ker P W`, `W̃_h = W_v[rows_h] diag(γ)` the rows of key-value
head `h`, and `σ` the sign of `det [Bᵀ P W; nᵀ]` (`B` an orthonormal basis of `1^⊥`). Then:
the centered-output factor keeps `P W`, hence `V`; the value-output `GL` (`W_v,h ↦ C_h W_v,h`,
`W_h ↦ W_h C_h⁻¹`, `det C_h > 0`) maps `n` along `C n`, `G_h` to `C_h G_h C_hᵀ` and keeps
`σ`, so `V ↦ C V` and the shift commutes with it; a rotation of the stream with `Q 1 = 1`
keeps `P W`'s kernel, `σ` (`det` of `Bᵀ Q B` is 1) and `G_h`; the LayerNorm's offset and
rescalings keep `W̃ P` and commute with the `1/s` coordinates; and the shift itself changes
`W̃_h` along `1` only, which `P` removes. All of it checked as for the shift with a bias
(`link_value_row_shifts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..groups._base import State
from ..groups._orthogonal import complement_basis
from ._value_rows import ValueRows

__all__ = ["AlongOne", "centered_columns", "one_dimensional_kernel"]

#: relative singular value below which `P W` counts as rank-deficient
_RANK = 1e-9


def centered_columns(
    W: Tensor, axis: int, offset: int, cols: int, block: int, repeat: int
) -> Tensor:
    """`P W`, `(d, cols)`: the output projection's columns `offset:` that the values reach
    (`axis`: its input axis), summed over the `repeat` query heads of each key-value head
    (`block` columns each), centered over the outputs."""
    w = W.narrow(axis, offset, cols * repeat)
    w = w if axis == 1 else w.T
    d = w.shape[0]
    w = w.reshape(d, cols // block, repeat, block).sum(2).reshape(d, cols)
    return w - w.mean(0, keepdim=True)


def one_dimensional_kernel(M: Tensor) -> bool:
    """`M` (`(d, d)`) has rank `d − 1` exactly (to `_RANK`)."""
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 2:
        return False
    s = torch.linalg.svdvals(M.double())
    top = float(s[0])
    return top > 0 and float(s[-2]) > _RANK * top and float(s[-1]) <= _RANK * top


@dataclass(frozen=True)
class AlongOne(ValueRows):
    """`W_v[rows] += (t/s) V ⊗ (1/γ)` (module docstring); the element `t` is `(1,)`.

    Fields as `ValueRows`'s, with `block` rows per key-value head and `repeat` query heads
    reading each; no bias takes anything back: `weight`, `axis`, `weight_offset` name the
    output projection's columns that `V` is built from."""

    block: int
    repeat: int = 1
    #: `V` is built from `P W`, the centered part of the output projection alone (so the
    #: centered-output factor of that projection keeps it, `_centering.py`)
    center: bool = True

    def direction(self, state: State, dtype: torch.dtype) -> Tensor:
        """`V`, `(rows,)`."""
        r = len(self.rows)
        M = centered_columns(
            state[self.weight].to(dtype), self.axis, self.weight_offset, r, self.block, self.repeat
        )
        d = M.shape[0]
        n = torch.linalg.svd(M)[2][-1]  # a unit vector spanning ker P W
        B = complement_basis(d, dtype)
        sign = torch.linalg.slogdet(torch.cat([B.T @ M, n[None, :]]))[0]
        nu = (n * self.metric(state, n)).sum()
        return sign * n / nu.sqrt()

    def metric(self, state: State, x: Tensor) -> Tensor:
        """`G⁻¹ x` head by head, `(rows,)`: `G_h = W̃_h P W̃_hᵀ` (`(block, block)`), the Gram
        matrix of key-value head `h`'s value rows centered over the features (`W̃ = W
        diag(γ)`), which the shift, the LayerNorm's offsets and rescalings and stream
        rotations keep, and the value-output `GL` maps to `C G Cᵀ`."""
        dtype = x.dtype
        inv, _ = self.coordinates(state, dtype)
        W = state[self.value].to(dtype)
        rows = (W if self.value_axis == 0 else W.T)[torch.tensor(self.rows)]
        wt = rows / inv[None, :]  # W̃ = W diag(γ)
        h = len(self.rows) // self.block
        wt = (wt - wt.mean(1, keepdim=True)).reshape(h, self.block, -1)
        G = wt @ wt.transpose(1, 2)  # (heads, block, block)
        return torch.linalg.solve(G, x.reshape(h, self.block, 1)).reshape(-1)

    def __call__(self, new: State, t: Tensor) -> None:
        dtype = new[self.value].dtype
        self.add_to_values(new, t.to(dtype).reshape(()) * self.direction(new, dtype))

    def touched(self) -> tuple[str, ...]:
        """The parameters it writes (`value`) or reads (the others)."""
        return (self.value, self.weight, *self.ln_params())
