"""Matrix factors restricted to a subalgebra: the invertible elements of an algebra `𝒜 ⊂ gl(d)`.

Where something sits between two linear maps that only some matrices commute with (rotary
position embeddings between the query and key projections, say), the symmetry is not all of
`GL(d)` but the group of units of the commutant: an associative algebra spanned by `basis`
(`(m, d, d)`), closed under products, so its exponential stays inside it. With `basis=None`
the algebra is all of `gl(d)` and the factor is `GL(d)`.

The terms are `MatTerm`s (left-multiplying blocks of a parameter), optionally wrapped in
`Repeat`, which lets one element block act on several consecutive blocks (the query heads
that share a key-value head under grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._base import AbstractFactor, State
from ._matrix import MatTerm, random_gl, singular_block

__all__ = ["AlgebraFactor", "Repeat", "block_moves", "commutant_basis", "unrepeated"]


@dataclass(frozen=True)
class Repeat:
    """`term` applied with every element block repeated `times` times in a row:
    blocks `(b, d, d)` become `(b·times, d, d)`."""

    term: MatTerm
    times: int

    @property
    def param(self) -> str:
        return self.term.param

    def __call__(self, new: State, g: Tensor) -> None:
        self.term(new, g.repeat_interleave(self.times, 0))


def unrepeated(term: Any) -> tuple[Any, int]:
    """`(inner term, times)` of a `Repeat`; any other term once."""
    return (term.term, term.times) if isinstance(term, Repeat) else (term, 1)


def block_moves(
    name: str, mode: str, start: int, d: int, times: int = 1, stride: int = 1
) -> list[tuple]:
    """The `moved_by` declarations of a shift whose blocks from entry `start` are moved by
    the element blocks of factor `name` (`d × d`, `mode` as in `MatTerm`), each element
    block acting on `times` consecutive blocks (a `Repeat`), the blocks `stride·d` apart
    (a strided `MatTerm`, heads interleaved with other rows): one declaration per
    repetition, its blocks `times·stride·d` apart (see `TranslationFactor`)."""
    if times == 1 and stride == 1:
        return [(name, mode, start)]
    return [(name, mode, start + r * stride * d, times * stride * d) for r in range(times)]


@dataclass(eq=False)
class AlgebraFactor(AbstractFactor):
    """`b` independent copies of the units of the algebra spanned by `basis` (`(m, d, d)`;
    `None`: all of `gl(d)`). Element: `(b, d, d)`. Algebra coordinates: `(b·m,)`."""

    d: int = 0
    b: int = 1
    basis: Tensor | None = field(default=None, kw_only=True)
    terms: tuple = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "gl"

    @property
    def m(self) -> int:
        return self.d * self.d if self.basis is None else int(self.basis.shape[0])

    def keeps_apart(self, held: Tensor) -> bool:
        """Whether every element maps the coordinates `held` (`(d,)` bool) to themselves and
        the others to themselves (block-diagonal in that split, as the query-key commutant
        under partial rotary keeps the unrotated and the rotated coordinates): always when
        all or none are held; never for all of `gl(d)` otherwise."""
        if bool(held.all()) or not bool(held.any()):
            return True
        if self.basis is None:
            return False
        keep, rest = held.nonzero().reshape(-1), (~held).nonzero().reshape(-1)
        tol = 1e-12 * max(1.0, float(self.basis.abs().max()))
        return (
            float(self.basis[:, keep][:, :, rest].abs().max()) <= tol
            and float(self.basis[:, rest][:, :, keep].abs().max()) <= tol
        )

    @property
    def dim(self) -> int:
        return self.b * self.m

    def identity(self, dtype=torch.float64) -> Tensor:
        return torch.eye(self.d, dtype=dtype).expand(self.b, self.d, self.d).clone()

    def _matrices(self, xi: Tensor) -> Tensor:
        xi = xi.reshape(self.b, self.m)
        if self.basis is None:
            return xi.reshape(self.b, self.d, self.d)
        return torch.einsum("bk,kij->bij", xi, self.basis.to(xi.dtype))

    def sample(self, generator=None, dtype=torch.float64, scale=0.5) -> Tensor:
        if self.basis is None:
            return random_gl(self.b, self.d, generator=generator, dtype=dtype, log_cond=4 * scale)
        xi = scale * torch.randn(self.dim, generator=generator, dtype=torch.float64)
        return self.exp(xi).to(dtype)

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    def inverse(self, a: Tensor) -> Tensor:
        self.validate(a)
        return torch.linalg.inv(a)

    def exp(self, xi: Tensor) -> Tensor:
        return torch.linalg.matrix_exp(self._matrices(xi))

    def validate(self, a: Tensor) -> None:
        if a.shape != (self.b, self.d, self.d):
            raise self._fail(f"expected shape ({self.b}, {self.d}, {self.d}), got {tuple(a.shape)}")
        self._check_finite(a)
        a64 = a.detach().double()
        if self.basis is not None:
            B = self.basis.double().reshape(self.m, -1)
            coef = torch.linalg.lstsq(B.T, a64.reshape(self.b, -1).T).solution
            off = (a64.reshape(self.b, -1) - (B.T @ coef).T).abs().amax()
            if off > 1e-9 * a64.abs().amax().clamp_min(1e-300):
                raise self._fail(
                    f"element is not in the factor's algebra (off by {float(off):.2e}): only "
                    "matrices commuting with what sits between the two maps are symmetries"
                )
        why = singular_block(a64)
        if why is not None:
            raise self._fail(why)

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.param for t in self.terms))


def commutant_basis(mats: Tensor, tol: float = 1e-9) -> Tensor | None:
    """A basis `(m, d, d)` of matrices commuting with every matrix of `mats` (`(n, d, d)`),
    read from their structure; `None` when every matrix is a multiple of the identity (the
    whole of `gl(d)` commutes).

    Indices whose rows and columns are diagonal in every matrix are grouped by their diagonal
    profile; each group gets all of `gl` on it. The other indices must come in pairs on which
    every matrix acts as `a·I + b·J` (a scaled rotation of the plane, as rotary embeddings
    do); each pair gets `span(I, J)`. Anything else keeps only multiples of the identity on
    its connected block. The result is a subalgebra of the commutant (all of it, unless two
    pairs rotate alike), so it never claims a matrix that fails to commute.
    """
    n, d, _ = mats.shape
    scale = mats.abs().amax().clamp_min(1e-300)
    nz = (mats.abs() > tol * scale).any(0)  # (d, d) support
    off = nz & ~torch.eye(d, dtype=torch.bool)
    diag_only = ~(off.any(0) | off.any(1))
    profiles = torch.diagonal(mats, dim1=-2, dim2=-1).T  # (d, n)
    basis: list[Tensor] = []

    def unit(i: int, j: int) -> Tensor:
        e = torch.zeros(d, d, dtype=torch.float64)
        e[i, j] = 1
        return e

    seen = torch.zeros(d, dtype=torch.bool)
    classes: list[list[int]] = []
    for i in range(d):
        if not diag_only[i] or seen[i]:
            continue
        same = diag_only & ((profiles - profiles[i]).abs() <= tol * scale).all(1) & ~seen
        members = same.nonzero().flatten().tolist()
        seen[members] = True
        classes.append(members)
    if len(classes) == 1 and len(classes[0]) == d:
        return None
    for members in classes:
        basis += [unit(a, b) for a in members for b in members]
    for i in range(d):
        if seen[i]:
            continue
        partners = off[i].nonzero().flatten().tolist()
        j = partners[0] if len(partners) == 1 else -1
        ok = j > i and off[j].nonzero().flatten().tolist() == [i]
        if ok:
            a, b, c, e = mats[:, i, i], mats[:, i, j], mats[:, j, i], mats[:, j, j]
            ok = bool(((a - e).abs() <= tol * scale).all() and ((b + c).abs() <= tol * scale).all())
        if ok:
            basis.append(unit(i, i) + unit(j, j))
            basis.append(unit(j, i) - unit(i, j))
            seen[[i, j]] = True
            continue
        block = _component(off, i) & ~seen
        seen |= block
        basis.append(torch.diag(block.double()))
    return torch.stack(basis)


def _component(adj: Tensor, i: int) -> Tensor:
    """The connected component of `i` in the undirected graph `adj | adjᵀ`."""
    sym = adj | adj.T
    comp = torch.zeros(adj.shape[0], dtype=torch.bool)
    comp[i] = True
    while True:
        grown = comp | sym[comp].any(0)
        if bool((grown == comp).all()):
            return comp
        comp = grown
