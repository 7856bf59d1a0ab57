"""Matrix gauge factors: `GL(d)` (possibly one copy per head) and the affine group `GA(d)`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ._base import AbstractFactor, State

__all__ = ["AffineFactor", "AffineTerm", "BlockGL", "GLFactor", "MatTerm", "random_gl"]

#: `"sign"` only in `moved_by` declarations (`_mode_matrix`), never in a `MatTerm`
Mode = Literal["G", "inv", "T", "invT", "Tc", "sign"]


def random_gl(
    b: int, d: int, *, generator=None, dtype=torch.float64, log_cond: float = 1.0
) -> Tensor:
    """`(b, d, d)` random invertible matrices `U diag(s) Vᵀ`, `U, V` Haar orthogonal (either
    determinant sign) and `log s` uniform in `[-log_cond/2, log_cond/2]`, so the condition
    number is at most `exp(log_cond)`."""
    z = torch.randn(2, b, d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(z)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    s = torch.exp(log_cond * (torch.rand(b, d, generator=generator, dtype=torch.float64) - 0.5))
    return (q[0] * s.unsqueeze(-2) @ q[1].transpose(-1, -2)).to(dtype)


def singular_block(a: Tensor) -> str | None:
    """Which of the matrices `a` (`(b, d, d)`) is singular to float64 precision, with its
    extreme singular values, or `None` when all are invertible."""
    s = torch.linalg.svdvals(a.detach().double())
    ratio = s[:, -1] / s[:, 0].clamp_min(1e-300)
    bad = (ratio < 1e-13).nonzero()
    if not len(bad):
        return None
    k = int(bad[0])
    return (
        f"matrix {k} is singular (singular values {float(s[k, 0]):.3e} ... {float(s[k, -1]):.3e})"
    )


def _mode_matrix(g: Tensor, mode: Mode) -> Tensor:
    if mode == "G":
        return g
    if mode == "sign":  # `(1, 1, 1)`: the sign of `Π_k det g_k` (a shift of one entry
        # whose direction follows an orientation, `discovery/_value_row_one.py`)
        return torch.linalg.det(g).sign().prod().reshape(1, 1, 1)
    if mode == "Tc":  # `Bᵀ Gᵀ B`: `Gᵀ` in coordinates of `1^⊥` (`G` keeps `1`)
        from ._orthogonal import complement_basis

        b = complement_basis(g.shape[-1], g.dtype)
        return b.T @ g.transpose(-1, -2) @ b
    if mode == "T":
        return g.transpose(-1, -2)
    inv = torch.linalg.inv(g)
    return inv if mode == "inv" else inv.transpose(-1, -2)


@dataclass(frozen=True)
class MatTerm:
    """Left-multiply `b` consecutive blocks of size `d` of `param` along `axis` by `M(g)`.

    The blocks start at `offset`; block `k` uses `M(g[k])` with `M` one of
    `G`, `G⁻¹`, `Gᵀ`, `G⁻ᵀ` (`mode`). For a torch `Linear` weight `W` (shape `(out, in)`,
    `y = W x`): `W ↦ G⁻¹ W` is `axis=0, mode="inv"` and `W ↦ W G` is `axis=1, mode="T"`.
    """

    param: str
    axis: int
    offset: int
    mode: Mode
    #: block `k` starts at `offset + k·stride·d` (other blocks packed in between, as
    #: GPT-NeoX's per-head query-key-value layout); 1: consecutive blocks
    stride: int = 1
    #: explicit entries, block after block (`b·d` indices along `axis`; `offset` and
    #: `stride` then unused): heads whose entries are not one block each, as a fused
    #: projection split into model-parallel partitions (CodeGen's)
    rows: tuple[int, ...] | None = None

    def index(self, b: int, d: int) -> Tensor:
        """The entries along `axis` of the first `b` blocks of size `d`: `(b, d)` long."""
        if self.rows is not None:
            if len(self.rows) < b * d or len(self.rows) % d:
                raise ValueError(f"MatTerm on {self.param}: {len(self.rows)} rows for {b}×{d}")
            return torch.tensor(self.rows, dtype=torch.long).reshape(-1, d)[:b]
        starts = self.offset + torch.arange(b) * self.stride * d
        return starts[:, None] + torch.arange(d)[None, :]

    def __call__(self, new: State, g: Tensor) -> None:
        b, d = g.shape[0], g.shape[-1]
        p = new[self.param].movedim(self.axis, 0)
        m = _mode_matrix(g.to(p.dtype), self.mode)
        if self.rows is not None and len(self.rows) != b * d:
            raise ValueError(f"MatTerm on {self.param}: {len(self.rows)} rows for {b}×{d}")
        if self.stride != 1 or self.rows is not None:
            idx = self.index(b, d).reshape(-1)
            out = p.clone()
            out[idx] = (m @ p[idx].reshape(b, d, -1)).reshape(b * d, *p.shape[1:])
            new[self.param] = out.movedim(0, self.axis)
            return
        head, block, tail = (
            p[: self.offset],
            p[self.offset : self.offset + b * d],
            p[self.offset + b * d :],
        )
        rest = block.shape[1:]
        block = (m @ block.reshape(b, d, -1)).reshape(b * d, *rest)
        new[self.param] = torch.cat([head, block, tail], 0).movedim(0, self.axis)


@dataclass(eq=False)
class BlockGL(AbstractFactor):
    """The group operations of `b` independent copies of `GL(d)`: element `(b, d, d)`,
    composed by matrix product (a right action), identity, sampling, inverse, exponential
    and validation. `GLFactor` and `LinearStreamFactor` act through different terms."""

    d: int = 0
    b: int = 1

    def __post_init__(self) -> None:
        self.kind = "gl"

    @property
    def dim(self) -> int:
        return self.b * self.d * self.d

    def identity(self, dtype=torch.float64) -> Tensor:
        return torch.eye(self.d, dtype=dtype).expand(self.b, self.d, self.d).clone()

    def sample(self, generator=None, dtype=torch.float64, scale=0.5) -> Tensor:
        return random_gl(self.b, self.d, generator=generator, dtype=dtype, log_cond=4 * scale)

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    def inverse(self, a: Tensor) -> Tensor:
        self.validate(a)
        return torch.linalg.inv(a)

    def exp(self, xi: Tensor) -> Tensor:
        return torch.linalg.matrix_exp(xi.reshape(self.b, self.d, self.d))

    def validate(self, a: Tensor) -> None:
        if a.shape != (self.b, self.d, self.d):
            raise self._fail(f"expected shape ({self.b}, {self.d}, {self.d}), got {tuple(a.shape)}")
        self._check_finite(a)
        why = singular_block(a)
        if why is not None:
            raise self._fail(why)


@dataclass(eq=False)
class GLFactor(BlockGL):
    """`b` independent copies of `GL(d)` (one per head, say). Element: `(b, d, d)`."""

    terms: tuple[MatTerm, ...] = field(default=(), kw_only=True)
    #: sampled condition numbers are at most `exp(log_cond)`
    log_cond: float = field(default=2.0, kw_only=True)

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.param for t in self.terms))


@dataclass(frozen=True)
class AffineTerm:
    """An affine layer `y = w x + b` seen as the augmented matrix `[[w, b], [0, 1]]`.

    `side="left"`: `Ā ↦ Ḡ⁻¹ Ā` (`w ↦ G⁻¹ w`, `b ↦ G⁻¹ (b − c)`), the layer producing the
    transformed state; `side="right"`: `Ā ↦ Ā Ḡ` (`w ↦ w G`, `b ↦ b + w c`), the layer
    reading it. `bias=None` for a layer without bias (then `c` must vanish, see
    `AffineFactor`).
    """

    weight: str
    bias: str | None
    side: Literal["left", "right"]

    def __call__(self, new: State, g: Tensor) -> None:
        d = g.shape[-1] - 1
        G, c = g[:d, :d].to(new[self.weight].dtype), g[:d, d].to(new[self.weight].dtype)
        w = new[self.weight]
        if self.side == "left":
            new[self.weight] = torch.linalg.solve(G, w)
            if self.bias is not None:
                new[self.bias] = torch.linalg.solve(G, new[self.bias] - c)
        else:
            new[self.weight] = w @ G
            if self.bias is not None:
                new[self.bias] = new[self.bias] + w @ c


@dataclass(eq=False)
class AffineFactor(AbstractFactor):
    """The affine group `GA(d)`: old state `x = G x' + c`. Element: `(d+1, d+1)` augmented
    matrix `[[G, c], [0, 1]]`, so that composition is matrix multiplication."""

    d: int = 0
    terms: tuple[AffineTerm, ...] = field(default=(), kw_only=True)
    log_cond: float = field(default=2.0, kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "affine"

    @property
    def dim(self) -> int:
        return self.d * self.d + self.d

    def identity(self, dtype=torch.float64) -> Tensor:
        return torch.eye(self.d + 1, dtype=dtype)

    def sample(self, generator=None, dtype=torch.float64, scale=0.5) -> Tensor:
        g = torch.eye(self.d + 1, dtype=torch.float64)
        g[: self.d, : self.d] = random_gl(1, self.d, generator=generator, log_cond=4 * scale)[0]
        g[: self.d, self.d] = torch.randn(self.d, generator=generator, dtype=torch.float64)
        return g.to(dtype)

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    def inverse(self, a: Tensor) -> Tensor:
        self.validate(a)
        return torch.linalg.inv(a)

    def exp(self, xi: Tensor) -> Tensor:
        d = self.d
        top = xi.reshape(d, d + 1)
        alg = torch.cat([top, torch.zeros(1, d + 1, dtype=xi.dtype)], 0)
        return torch.linalg.matrix_exp(alg)

    def validate(self, a: Tensor) -> None:
        d = self.d
        if a.shape != (d + 1, d + 1):
            raise self._fail(
                f"expected an augmented matrix of shape ({d + 1}, {d + 1}), got {tuple(a.shape)}"
            )
        self._check_finite(a)
        last = a[d].detach().double()
        want = torch.zeros(d + 1, dtype=torch.float64)
        want[d] = 1
        if not torch.allclose(last, want, atol=1e-12, rtol=0):
            raise self._fail(f"last row must be (0, ..., 0, 1), got {last.tolist()}")
        s = torch.linalg.svdvals(a[:d, :d].detach().double())
        if s[-1] < 1e-13 * s[0]:
            raise self._fail(
                f"linear part is singular (smallest singular value {float(s[-1]):.3e})"
            )

    def params(self) -> tuple[str, ...]:
        out = [t.weight for t in self.terms] + [t.bias for t in self.terms if t.bias]
        return tuple(dict.fromkeys(out))
