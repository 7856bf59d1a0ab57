"""The canonical element of a subalgebra factor (`AlgebraFactor`): a balanced form per block.

The factor's terms split into two sides: blocks `P ↦ Gᵀ P` (mode `"T"`) and blocks
`P ↦ G⁻¹ P` (mode `"inv"`) (or `"G"` / `"invT"`, the same with `G` transposed). Stacking,
per element block, the first side's blocks as `X` `(d, n)` and the second's as `Y` `(d, m)`,
`Xᵀ Y` is invariant, and the element is chosen to make the two sides balanced:

- on a block of indices where the algebra is all of `gl` (all of `gl(d)` when the factor
  has no basis): `Aᵀ X` and `A⁻¹ Y` with equal, diagonal Gram matrices, the SVD of
  `Xᵀ Y` split evenly (as the attention heads' balanced form), singular vectors signed so
  that their largest entry is positive;
- on a rotated plane (`span(I, J)`, rotary embeddings): the scale `|z|` that equalizes the
  two sides' norms, and the rotation that makes the plane's Gram matrix of `X` diagonal with
  its larger entry first and the largest entry of its first row positive;
- on a block of multiples of the identity: the scale that equalizes the norms, with the
  sign that makes the largest entry of `X` positive.

For generic weights the result is the same for every point of the orbit. A block of another
shape, or a factor whose terms mix the two conventions, keeps the identity (left where it
is, never moved wrongly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._algebra import AlgebraFactor, Repeat
from ._base import State
from ._canonical_hooks import register_canonicalizer
from ._matrix import GLFactor, MatTerm

__all__ = ["algebra_blocks", "canonical_algebra_element"]


def algebra_blocks(basis: Tensor | None, d: int) -> list[tuple[str, list[int]]]:
    """The algebra's blocks: `(kind, indices)` with kind `"gl"`, `"plane"`, `"scalar"` or
    `"other"`, from the supports of its basis matrices."""
    if basis is None:
        return [("gl", list(range(d)))]
    parent = list(range(d))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    supports = []
    for m in basis:
        idx = sorted(set((m.abs() > 0).nonzero().flatten().tolist()))
        supports.append(idx)
        for a in idx[1:]:
            parent[find(a)] = find(idx[0])
    groups: dict[int, list[int]] = {}
    for i in range(d):
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in groups.values():
        k = sum(1 for s in supports if s and find(s[0]) == find(members[0]))
        mats = [m for m, s in zip(basis, supports) if s and find(s[0]) == find(members[0])]
        if k == len(members) ** 2:
            out.append(("gl", members))
        elif len(members) == 2 and k == 2 and any(bool((m + m.T).abs().max() == 0) for m in mats):
            out.append(("plane", members))
        elif k == 1 and bool((mats[0] == torch.diag(torch.diagonal(mats[0]))).all()):
            out.append(("scalar", members))
        else:
            out.append(("other", members))
    return out


def _blocks(term: MatTerm, state: State, j: int, d: int) -> Tensor:
    """Block `j` of `term`'s parameter `(d, rest)` (float64)."""
    p = state[term.param].detach().double().movedim(term.axis, 0)
    return p[term.index(j + 1, d)[j]].reshape(d, -1)


def _sides(
    f: AlgebraFactor | GLFactor, state: State
) -> tuple[list[Tensor], list[Tensor], bool] | None:
    """Per element block, `X` and `Y` (`(d, n)`, `(d, m)`), and whether the terms use the
    transposed convention (`"G"`/`"invT"`); `None` when they mix conventions."""
    xs: list[list[Tensor]] = [[] for _ in range(f.b)]
    ys: list[list[Tensor]] = [[] for _ in range(f.b)]
    modes = set()
    for t in f.terms:
        times = t.times if isinstance(t, Repeat) else 1
        term = t.term if isinstance(t, Repeat) else t
        modes.add(term.mode)
        side = xs if term.mode in ("T", "G") else ys
        for k in range(f.b):
            for r in range(times):
                side[k].append(_blocks(term, state, k * times + r, f.d))
    if not (modes <= {"T", "inv"} or modes <= {"G", "invT"}):
        return None
    if any(not x or not y for x, y in zip(xs, ys)):
        return None
    return [torch.cat(x, 1) for x in xs], [torch.cat(y, 1) for y in ys], modes <= {"G", "invT"}


def _signed(u: Tensor) -> Tensor:
    """Columns of `u` with their largest-magnitude entry positive."""
    idx = u.abs().argmax(0, keepdim=True)
    sign = torch.sign(torch.gather(u, 0, idx))
    return u * torch.where(sign == 0, torch.ones_like(sign), sign)


def _gl_block(x: Tensor, y: Tensor) -> Tensor:
    """`A` with `Aᵀ x`, `A⁻¹ y` balanced: `A = R⁻¹ U S^{1/2}` for `xᵀ = Q R` and the SVD
    `R R_yᵀ = U S Vᵀ` (`U` signed by the full left singular vectors `Q U`)."""
    qa, ra = torch.linalg.qr(x.T)
    _, rb = torch.linalg.qr(y.T)
    u, s, _ = torch.linalg.svd(ra @ rb.T)
    u = qa.T @ _signed(qa @ u)
    return torch.linalg.solve(ra, u * s.sqrt())


def _plane_block(x: Tensor, y: Tensor) -> Tensor:
    """`r R(θ)`: equal norms, the plane's Gram of `x` diagonal, larger entry first, the
    largest entry of its first row positive."""
    r = (torch.linalg.norm(y) / torch.linalg.norm(x)).sqrt()
    _, vecs = torch.linalg.eigh(x @ x.T)
    v = vecs.flip(1)  # larger eigenvalue first
    if torch.linalg.det(v) < 0:
        v = v * torch.tensor([1.0, -1.0], dtype=v.dtype)
    row = (v.T @ x)[0]
    if row[row.abs().argmax()] < 0:
        v = -v
    return r * v  # A = r V: Aᵀ x = r Vᵀ x


def _scalar_block(x: Tensor, y: Tensor) -> Tensor:
    c = (torch.linalg.norm(y) / torch.linalg.norm(x)).sqrt()
    big = x.reshape(-1)[x.abs().argmax()]
    return (c if big >= 0 else -c) * torch.eye(x.shape[0], dtype=x.dtype)


_SOLVERS = {"gl": _gl_block, "plane": _plane_block, "scalar": _scalar_block}


def canonical_algebra_element(f: AlgebraFactor | GLFactor, state: State) -> Tensor:
    """The element `(b, d, d)` bringing `state` to the balanced form of `f` (see above); a
    `GLFactor` (the `GL` between two linear layers) is one `"gl"` block per copy."""
    sides = _sides(f, state)
    out = f.identity(torch.float64)
    if sides is None:
        return out
    xs, ys, transposed = sides
    basis = getattr(f, "basis", None)  # a `GLFactor` is all of `gl(d)`
    blocks = algebra_blocks(None if basis is None else basis.double(), f.d)
    for k in range(f.b):
        for kind, idx in blocks:
            solve = _SOLVERS.get(kind)
            if solve is None:
                continue
            i = torch.tensor(idx)
            x, y = xs[k][i], ys[k][i]
            if min(x.shape[1], y.shape[1]) < len(idx) and kind == "gl":
                continue  # fewer columns than the block: no unique balanced form
            if torch.linalg.norm(x) == 0 or torch.linalg.norm(y) == 0:
                continue
            a = solve(x, y)
            out[k][i[:, None], i[None, :]] = a.T if transposed else a
    return out


register_canonicalizer(AlgebraFactor, canonical_algebra_element)
# the attention factors (`GLFactor` subclasses) register their own forms after this one
register_canonicalizer(GLFactor, canonical_algebra_element)
