"""The residual-stream symmetry of a pre-LN transformer whose LayerNorms have no affine part.

Every module writes into the stream `h ∈ R^d` by addition (embedding, attention output,
MLP output) and every module reads it through `LayerNorm(h) = (h − mean(h) 1) / std(h)`.
For an orthogonal `Q` with `Q 1 = 1`, `LayerNorm(Qᵀ h) = Qᵀ LayerNorm(h)`: the mean and the
centered norm are unchanged. So `h ↦ Qᵀ h` is a symmetry when every writer `W` (torch
`Linear`, rows over the stream) becomes `Qᵀ W`, its bias `Qᵀ b`, and every reader `W`
(columns over the stream) becomes `W Q`. These `Q` form `O(d − 1)` (rotations of the
complement of `1`); the permutations of the `d` features are a finite subgroup of it.

A LayerNorm *with* a per-feature weight only commutes with the permutations; a general
`GL(d)` element does not commute with any LayerNorm: neither is a symmetry here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import GaugeError
from ..groups import GLFactor, MatTerm, PermTerm, PermutationFactor
from ..groups._orthogonal import complement_basis

__all__ = ["ResidualRotationFactor", "residual_factors"]


@dataclass(eq=False)
class ResidualRotationFactor(GLFactor):
    """`O(d − 1)`: orthogonal `Q` with `Q 1 = 1`, acting on a residual stream of `d`
    features. Element: `(1, d, d)` (one block, as a `GLFactor`); writers' terms use mode
    `"T"` (`W ↦ Qᵀ W`), readers' terms mode `"inv"` (`W ↦ W Q⁻ᵀ = W Q`)."""

    def __post_init__(self) -> None:
        self.kind = "orthogonal"

    @property
    def dim(self) -> int:
        return (self.d - 1) * (self.d - 2) // 2

    def from_rotation(self, r: Tensor) -> Tensor:
        """`Q = 11ᵀ/d + B R Bᵀ` for `R ∈ O(d − 1)` `(d − 1, d − 1)`: `(1, d, d)`."""
        b = complement_basis(self.d, r.dtype)
        ones = torch.full((self.d, self.d), 1.0 / self.d, dtype=r.dtype)
        return (ones + b @ r @ b.T).unsqueeze(0)

    def exp(self, xi: Tensor) -> Tensor:
        m = self.d - 1
        s = torch.zeros(m, m, dtype=xi.dtype)
        iu = torch.triu_indices(m, m, 1)
        s = s.index_put((iu[0], iu[1]), xi)
        return self.from_rotation(torch.linalg.matrix_exp(s - s.T))

    def sample(self, generator=None, dtype=torch.float64, scale=0.5) -> Tensor:
        xi = scale * torch.randn(self.dim, generator=generator, dtype=torch.float64)
        return self.exp(xi).to(dtype)

    def validate(self, a: Tensor) -> None:
        super().validate(a)
        q = a[0].double()
        tol = 1e-10 if a.dtype == torch.float64 else 1e-4
        eye = torch.eye(self.d, dtype=torch.float64)
        if float((q.T @ q - eye).abs().max()) > tol:
            raise self._fail("element is not orthogonal (QᵀQ ≠ I)")
        ones = torch.ones(self.d, dtype=torch.float64)
        if float((q @ ones - ones).abs().max()) > tol:
            raise self._fail("element does not fix the all-ones vector (Q1 ≠ 1)")


def residual_factors(
    name: str,
    d: int,
    writers: Sequence[tuple[str, int]],
    readers: Sequence[tuple[str, int]],
) -> list:
    """The rotation and permutation factors of one residual stream.

    **Arguments:**

    - `name`: factor names are `rot:{name}` and `perm:{name}`.
    - `d`: the width of the stream.
    - `writers`: `(param, axis)` of every parameter whose `axis` runs over the stream on its
      output side (the rows of a `Linear` weight writing into it, its bias, an added
      position table).
    - `readers`: `(param, axis)` of every parameter reading the stream after a LayerNorm
      without affine part (the columns of the `Linear` weights after it).

    **Returns:** `[ResidualRotationFactor, PermutationFactor]`.
    """
    if not writers or not readers:
        raise GaugeError("a residual stream needs at least one writer and one reader")
    modules = tuple(dict.fromkeys(p.rpartition(".")[0] for p, _ in (*writers, *readers)))
    terms = [MatTerm(p, ax, 0, "T") for p, ax in writers]
    terms += [MatTerm(p, ax, 0, "inv") for p, ax in readers]
    rot = ResidualRotationFactor(f"rot:{name}", d, 1, terms=tuple(terms), modules=modules)
    idx = torch.arange(d).reshape(d, 1)
    perm = PermutationFactor(
        f"perm:{name}",
        d,
        terms=tuple(PermTerm(p, ax, idx) for p, ax in (*writers, *readers)),
        modules=modules,
    )
    return [rot, perm]
