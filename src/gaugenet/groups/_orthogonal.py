"""The orthogonal group `O(d)` of a residual stream (the computational invariance that
rotation-based quantization uses).

A stream `x` (tokens as rows) that is written only by embeddings and linear maps, and read
only through RMS normalizations `n(x) = x / rms(x)` followed by a gain `γ` and linear maps,
may be rotated: `x ↦ x Q` with `Q` orthogonal keeps `rms`, so `n(x Q) = n(x) Q`. The readers
take the rotation back with the gain conjugated: `W ↦ W diag(γ) Q diag(γ)⁻¹`, which leaves
`γ` where it is (and so commutes with the rescalings of `γ`).

Terms: `RotateRows` (writers, `W ↦ Qᵀ W`, `b ↦ Qᵀ b`), `RotateColumns` (embedding tables,
`E ↦ E Q`, and writers stored `(in, d)` as GPT-2's `Conv1D`), `RotateBlock` (the rows of a
writer whose output is split, one part starting the stream) and `ConjugatedColumns` (readers
after a gain; `ConjugatedRows` for readers stored `(d, out)`). Element: `(d, d)` orthogonal,
either determinant. Algebra coordinates: the `d(d−1)/2` entries above the diagonal of a
skew-symmetric matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._base import AbstractFactor, State
from ._canonical_hooks import register_canonicalizer

__all__ = [
    "ConjugatedColumns",
    "ConjugatedRow",
    "ConjugatedRows",
    "OrthogonalFactor",
    "RotateBlock",
    "RotateColumns",
    "RotateRows",
    "complement_basis",
]


def complement_basis(d: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """An orthonormal basis `(d, d − 1)` of the vectors orthogonal to `1` (Householder)."""
    e = torch.zeros(d, dtype=torch.float64)
    e[0] = 1.0
    w = torch.ones(d, dtype=torch.float64) / d**0.5 - e
    h = torch.eye(d, dtype=torch.float64) - 2 * torch.outer(w, w) / (w @ w)
    return h[:, 1:].to(dtype)  # h maps e_0 to 1/√d: its other columns span 1^⊥


def _gain(new: State, name: str, offset: float, dtype: torch.dtype) -> Tensor:
    """The effective gain `state[name] + offset` (the conjugation divides by it)."""
    g = new[name].to(dtype)
    return g + offset if offset else g


@dataclass(frozen=True)
class RotateRows:
    """`param ↦ Qᵀ param` along axis 0 (a writer's weight `(d, k)` or bias `(d,)`)."""

    param: str

    def __call__(self, new: State, q: Tensor) -> None:
        p = new[self.param]
        new[self.param] = torch.tensordot(q.to(p.dtype).T, p, dims=([1], [0]))


@dataclass(frozen=True)
class RotateColumns:
    """`param ↦ param Q` (an embedding table `(vocab, d)`)."""

    param: str

    def __call__(self, new: State, q: Tensor) -> None:
        p = new[self.param]
        new[self.param] = p @ q.to(p.dtype)


@dataclass(frozen=True)
class RotateBlock:
    """`param[start:stop] ↦ Qᵀ param[start:stop]` along `axis`, the other entries kept: a
    writer whose output is split, one part starting a stream (rows of a weight `(out, in)`
    or a bias with `axis = 0`, columns of an `addmm` weight `(in, out)` with `axis = 1`)."""

    param: str
    axis: int
    start: int
    stop: int

    def __call__(self, new: State, q: Tensor) -> None:
        p = new[self.param]
        block = p.narrow(self.axis, self.start, self.stop - self.start).movedim(self.axis, 0)
        turned = torch.tensordot(q.to(p.dtype).T, block, dims=([1], [0])).movedim(0, self.axis)
        parts = [
            p.narrow(self.axis, 0, self.start),
            turned,
            p.narrow(self.axis, self.stop, p.shape[self.axis] - self.stop),
        ]
        new[self.param] = torch.cat(parts, self.axis)


@dataclass(frozen=True)
class ConjugatedColumns:
    """`param ↦ param diag(γ) Q diag(γ)⁻¹` with `γ = state[gain]` (a reader `(m, d)`)."""

    param: str
    gain: str
    #: the gain is read as `state[gain] + offset` (Gemma's `1 + w`)
    offset: float = 0.0

    def __call__(self, new: State, q: Tensor) -> None:
        p = new[self.param]
        g = _gain(new, self.gain, self.offset, p.dtype)
        new[self.param] = (p * g) @ q.to(p.dtype) / g


@dataclass(frozen=True)
class ConjugatedRows:
    """`param ↦ diag(γ)⁻¹ Qᵀ diag(γ) param` with `γ = state[gain]`: `ConjugatedColumns` for a
    reader stored transposed, `(d, m)` (an `addmm` weight, GPT-2's `Conv1D`)."""

    param: str
    gain: str
    #: the gain is read as `state[gain] + offset` (Gemma's `1 + w`)
    offset: float = 0.0

    def __call__(self, new: State, q: Tensor) -> None:
        p = new[self.param]
        g = _gain(new, self.gain, self.offset, p.dtype)[:, None]
        new[self.param] = q.to(p.dtype).T @ (p * g) / g


@dataclass(frozen=True)
class ConjugatedRow:
    """`param ↦ param diag(γ)⁻¹ Q diag(γ)` with `γ = state[gain]` (a LayerNorm's shift `β`
    `(d,)`, so that readers conjugated by `ConjugatedColumns` still see `β`)."""

    param: str
    gain: str
    #: the gain is read as `state[gain] + offset` (Gemma's `1 + w`)
    offset: float = 0.0

    def __call__(self, new: State, q: Tensor) -> None:
        p = new[self.param]
        g = _gain(new, self.gain, self.offset, p.dtype)
        new[self.param] = (p / g) @ q.to(p.dtype) * g


@dataclass(eq=False)
class OrthogonalFactor(AbstractFactor):
    """`O(d)` acting on one residual stream through `terms`; with `fixes_ones`, the subgroup
    `O(d − 1)` of the `Q` with `Q 1 = 1` (a stream read through LayerNorms, which subtract
    the mean: `LN(x Q) = LN(x) Q` only when `Q` keeps `1`)."""

    d: int = 0
    terms: tuple = field(default=(), kw_only=True)
    #: the parameter whose principal axes give the canonical form (or `None`): the stream's
    #: embedding table, or the linear map whose output starts it
    table: str | None = field(default=None, kw_only=True)
    #: the axis of `table` over the stream's features (1 for a table `(vocab, d)`, 0 for a
    #: linear map's weight `(d, in)`)
    table_axis: int = field(default=1, kw_only=True)
    #: the entries `[start, stop)` of `table` along `table_axis` that the stream holds (a
    #: writer whose output is split), or `None` for all
    table_block: tuple[int, int] | None = field(default=None, kw_only=True)
    fixes_ones: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "orthogonal"

    @property
    def dim(self) -> int:
        m = self.d - 1 if self.fixes_ones else self.d
        return m * (m - 1) // 2

    def _embed(self, r: Tensor) -> Tensor:
        """`11ᵀ/d + B R Bᵀ` for `R` `(d − 1, d − 1)`, `B` the complement basis of `1`."""
        b = complement_basis(self.d, r.dtype)
        return torch.full((self.d, self.d), 1.0 / self.d, dtype=r.dtype) + b @ r @ b.T

    def identity(self, dtype=torch.float64) -> Tensor:
        return torch.eye(self.d, dtype=dtype)

    def sample(self, generator=None, dtype=torch.float64, scale=0.5) -> Tensor:
        m = self.d - 1 if self.fixes_ones else self.d
        z = torch.randn(m, m, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(z)
        q = q * torch.sign(torch.diagonal(r))
        return (self._embed(q) if self.fixes_ones else q).to(dtype)

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    def inverse(self, a: Tensor) -> Tensor:
        self.validate(a)
        return a.transpose(-1, -2)

    def exp(self, xi: Tensor) -> Tensor:
        m = self.d - 1 if self.fixes_ones else self.d
        iu = torch.triu_indices(m, m, 1)
        s = torch.zeros(m, m, dtype=xi.dtype)
        s = s.index_put((iu[0], iu[1]), xi)
        r = torch.linalg.matrix_exp(s - s.T)
        return self._embed(r) if self.fixes_ones else r

    def validate(self, a: Tensor) -> None:
        if a.shape != (self.d, self.d):
            raise self._fail(f"expected shape ({self.d}, {self.d}), got {tuple(a.shape)}")
        self._check_finite(a)
        a64 = a.detach().double()
        err = (a64.T @ a64 - torch.eye(self.d, dtype=torch.float64)).abs().max()
        tol = 1e-10 if a.dtype == torch.float64 else 1e-5
        if err > tol:
            raise self._fail(f"element is not orthogonal (|QᵀQ − I| = {float(err):.2e})")
        if self.fixes_ones:
            moved = (a64.sum(1) - 1).abs().max()
            if moved > tol:
                raise self._fail(
                    f"element does not fix the all-ones vector (|Q1 − 1| = {float(moved):.2e})"
                )

    def params(self) -> tuple[str, ...]:
        out = []
        for t in self.terms:
            out.append(t.param)
            if isinstance(t, (ConjugatedColumns, ConjugatedRows, ConjugatedRow)):
                out.append(t.gain)
        return tuple(dict.fromkeys(out))

    def canonical_element(self, state: State) -> Tensor:
        """The rotation to the principal axes of the table `E` (eigenvectors of `EᵀE` by
        decreasing eigenvalue, each signed so that its column of `E Q` has a positive third
        moment; `E` is the embedding table `(vocab, d)`, or the transposed weight `(in, d)`
        of the linear map that starts the stream): the same result from every point of the
        orbit, for tables with distinct eigenvalues."""
        if self.table is None:
            return self.identity()
        e = state[self.table].double()
        if self.table_block is not None:
            start, stop = self.table_block
            e = e.narrow(self.table_axis, start, stop - start)
        e = e.T if self.table_axis == 0 else e
        if self.fixes_ones:  # the same within `1^⊥`: `E B R` for `Q = 11ᵀ/d + B R Bᵀ`
            e = e @ complement_basis(self.d)
        _, u = torch.linalg.eigh(e.T @ e)
        u = u.flip(-1)
        sign = torch.sign(((e @ u) ** 3).sum(0))
        sign[sign == 0] = 1
        return self._embed(u * sign) if self.fixes_ones else u * sign


def _canonical(f: OrthogonalFactor, state: State) -> Tensor:
    return f.canonical_element(state)


register_canonicalizer(OrthogonalFactor, _canonical)
