"""The kernel of a LayerNorm's mean subtraction, seen by the layers that read its output.

A LayerNorm over the last axis returns `y = γ ⊙ n + β` with `n` of zero mean, so every
output satisfies `Σ_j (y_j − β_j) / γ_j = 0`. A linear layer reading `y` therefore cannot
see the direction `u = 1/γ` in any of its rows: for every row `i`,

    W[i] ↦ W[i] + a_i u,    b[i] ↦ b[i] − a_i Σ_j β_j / γ_j

changes no output (`(W[i] + a_i u) · y = W[i] · y + a_i Σ β/γ`). It holds whatever else
reads `y` (a residual branch, say), one dimension per row of every reader.

The group `R^rows` acts additively. It commutes with the LayerNorm's own rescalings (they
rescale `γ` and the readers' columns together, so `u` moves along) and with the other
shifts, but not with transformations of the readers' rows: a row rescaling `D` or a
row-block `GL` element `M` maps the shift `a` to `D a` or `M a`. `link_kernels` finds those
factors once the whole group is known and declares them in `scaled_by` / `moved_by`; it
also makes the permutations of rows (units, heads) carry the shift's entries along.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..groups import AffineFactor, GLFactor, PermutationFactor, TranslationFactor
from ..groups._algebra import AlgebraFactor, block_moves, unrepeated
from ..groups._base import AbstractFactor, State
from ..groups._orthogonal import OrthogonalFactor, RotateBlock, RotateRows
from ._monomials import unscaled_index
from ._offset_layernorm import gain_offset
from ._relink import relink

__all__ = [
    "LayerNormKernelFactor",
    "MeanKernel",
    "ReaderSlot",
    "ill_conditioned",
    "kernel_factor",
    "link_kernels",
    "without_tied",
]

#: `min |γ| / max |γ|` below which the direction `1/γ` is not offered
GAMMA_RATIO = 1e-6


def ill_conditioned(gamma: Tensor | None) -> str | None:
    """Why the kernel direction `1/γ` of a LayerNorm is not offered, or `None`.

    With a (near-)zero `γ_j` the direction is dominated by `1/γ_j` and acting along it
    moves weights by `a/γ_j`, which rounding destroys. Such a feature is (nearly) the
    constant `β_j`, a redundancy of its own that no factor here describes. A gain on the
    meta device (discovery for a streamed checkpoint) has no values to judge: offered."""
    if gamma is None or gamma.is_meta:
        return None
    g = gamma.detach().abs()
    if float(g.min()) < GAMMA_RATIO * float(g.max()):
        k = int(g.argmin())
        return (
            f"γ[{k}] = {float(gamma.detach()[k]):.1e} (of max |γ| {float(g.max()):.1e}): the "
            "mean-subtraction kernel 1/γ is ill-conditioned and not offered; features with "
            "γ ≈ 0 are constant, a redundancy left unexplained"
        )
    return None


@dataclass(frozen=True)
class ReaderSlot:
    """Outputs `[start, stop)` of `weight` (a matrix reading the LayerNorm: `(rows,
    features)` with `out_axis = 0`, as `nn.Linear`; `(features, rows)` with `out_axis = 1`,
    as an `addmm` weight) and the same entries of `bias` (or no bias)."""

    weight: str
    bias: str | None
    start: int
    stop: int
    out_axis: int = 0
    #: no bias takes back the constant this slot adds: kept only if its rows turn out to
    #: be the keys of a softmax attention, which ignores a constant on every key
    pending: bool = False

    @property
    def size(self) -> int:
        return self.stop - self.start


def _pad_rows(delta: Tensor, start: int, total: int) -> Tensor:
    """`delta` placed at rows `start:` of a zero tensor with `total` rows (no in-place ops,
    so that `torch.func` transforms go through)."""
    shape = delta.shape[1:]
    before = delta.new_zeros(start, *shape)
    after = delta.new_zeros(total - start - delta.shape[0], *shape)
    return torch.cat([before, delta, after])


@dataclass(frozen=True)
class MeanKernel:
    """`W[rows] += a ⊗ (1/γ)`, `b[rows] −= a Σ β/γ` for every reader slot, in turn.

    `ln` is the LayerNorm's module name; `weight` / `bias` say whether it has `γ` / `β`
    (absent means `γ = 1`, `β = 0`)."""

    ln: str
    features: int
    weight: bool
    bias: bool
    slots: tuple[ReaderSlot, ...]
    #: `γ` is read as `weight + gain_offset` (a gain stored with an offset)
    gain_offset: float = 0.0

    def direction(self, state: State, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`u = 1/γ` `(features,)` and `Σ β/γ` (a scalar tensor)."""
        gamma = (
            state[f"{self.ln}.weight"].to(dtype) + self.gain_offset
            if self.weight
            else torch.ones(self.features, dtype=dtype)
        )
        u = 1 / gamma
        c = (state[f"{self.ln}.bias"].to(dtype) * u).sum() if self.bias else u.new_zeros(())
        return u, c

    def __call__(self, new: State, a: Tensor) -> None:
        dtype = new[self.slots[0].weight].dtype
        u, c = self.direction(new, dtype)
        a = a.to(dtype)
        k = 0
        for s in self.slots:
            ak = a[k : k + s.size]
            k += s.size
            W = new[s.weight]
            rows = W if s.out_axis == 0 else W.T
            rows = rows + _pad_rows(ak[:, None] * u[None, :], s.start, rows.shape[0])
            new[s.weight] = rows if s.out_axis == 0 else rows.T
            if s.bias is not None:
                b = new[s.bias]
                new[s.bias] = b - _pad_rows(ak * c, s.start, b.shape[0])

    @property
    def offsets(self) -> list[int]:
        """Where each slot's rows start in the element."""
        sizes = [s.size for s in self.slots]
        return [sum(sizes[:i]) for i in range(len(sizes))]

    def touched(self) -> tuple[str, ...]:
        out = [p for s in self.slots for p in (s.weight, s.bias) if p is not None]
        if self.weight:
            out.append(f"{self.ln}.weight")
        if self.bias:
            out.append(f"{self.ln}.bias")
        return tuple(dict.fromkeys(out))


class LayerNormKernelFactor(TranslationFactor):
    """`R^rows`: the mean-subtraction kernel of one LayerNorm in every reader's rows."""

    @property
    def kernel(self) -> MeanKernel:
        return self.terms[0]

    def params(self) -> tuple[str, ...]:
        return self.kernel.touched()

    def canonical(self, state: State) -> Tensor:
        """The shift giving every reader row `W[i] · γ = 0`: the row's weights on the
        normalized features `n` (`W[i] ⊙ γ`) have zero mean, the part `n ⊥ 1` never sees.

        It is the canonical gauge because the condition survives every other factor: row
        transformations are linear, and the LayerNorm's rescalings (one scalar, or one per
        feature) divide `W`'s columns by what they multiply `γ` by."""
        k = self.kernel
        dtype = state[k.slots[0].weight].dtype
        u, _ = k.direction(state, dtype)
        gamma = 1 / u
        rows = [_rows(state[s.weight], s)[s.start : s.stop] @ gamma for s in k.slots]
        return -torch.cat(rows) / (u @ gamma)


def kernel_factor(name: str, ln: nn.LayerNorm, slots: list[ReaderSlot]) -> LayerNormKernelFactor:
    """The kernel factor of the LayerNorm `name` (`ln`) in the rows of `slots`."""
    E = ln.normalized_shape[0]
    w, b = ln.weight is not None, ln.bias is not None
    term = MeanKernel(name, E, w, b, tuple(slots), gain_offset(ln))
    mods = tuple(dict.fromkeys((name, *(s.weight.rpartition(".")[0] for s in slots))))
    return LayerNormKernelFactor(
        f"ln_kernel:{name}", sum(s.size for s in slots), terms=(term,), modules=mods
    )


def without_tied(f: LayerNormKernelFactor, tied: set[str]) -> LayerNormKernelFactor | None:
    """`f` in the rows of its readers whose weight and bias no other operation reads (each
    reader's rows move alone, their bias taking back the constant they add: any subset of
    readers is a symmetry): DeBERTa's query and key projections also read the relative
    position table. `None` when no reader is left. The LayerNorm's own `γ`, `β` are only
    read (for `1/γ` and `Σ β/γ`), so a LayerNorm called several times (a shared layer)
    keeps the kernel in the readers of this call."""
    k = f.kernel
    slots = [s for s in k.slots if not {s.weight, s.bias} & tied]
    if len(slots) == len(k.slots):
        return f
    if not slots:
        return None
    term = dataclasses.replace(k, slots=tuple(slots))
    mods = tuple(dict.fromkeys((k.ln, *(s.weight.rpartition(".")[0] for s in slots))))
    return LayerNormKernelFactor(f.name, sum(s.size for s in slots), terms=(term,), modules=mods)


def _rows(W: Tensor, slot: ReaderSlot) -> Tensor:
    """`W` with the slot's outputs along axis 0."""
    return W if slot.out_axis == 0 else W.T


# -- linking with the rest of the group ---------------------------------------------------


def _row_scaling(
    f: AbstractFactor, slot: ReaderSlot, ln: str, features: int
) -> tuple[Tensor, int] | None:
    """How `f` (a factor with `Scale` terms) rescales the rows of `slot`: `(index, power)`
    per row, or `None` when it does not (or rescales columns together with `γ`, which
    moves `1/γ` along and commutes with the kernel)."""
    if any(getattr(t, "param", None) == f"{ln}.weight" for t in f.terms):
        return None
    for t in f.terms:
        if getattr(t, "param", None) != slot.weight or not hasattr(t, "power"):
            continue
        idx = t.index if t.index.ndim == 2 else t.index.reshape(1, -1)
        if slot.out_axis == 1:
            idx = idx.T
        rows = int(idx.shape[0]) if idx.shape[0] > 1 else slot.stop
        idx = torch.broadcast_to(idx, (rows, features))[slot.start : slot.stop]
        if not bool((idx == idx[:, :1]).all()):
            raise _Unsupported
        return idx[:, 0].reshape(-1), int(t.power)
    return None


class _Unsupported(Exception):
    """A factor transforms a reader in a way the kernel's composition rules do not cover."""


def _link_one(k: LayerNormKernelFactor, factors: list) -> LayerNormKernelFactor | None:
    kern = k.kernel
    offsets = kern.offsets
    scaled, moved = [], []
    for f in factors:
        if f is k or isinstance(f, (TranslationFactor, PermutationFactor)):
            continue
        touched = set(f.params())
        if not touched & {s.weight for s in kern.slots}:
            continue
        if isinstance(f, AffineFactor):
            return None
        if isinstance(f, (GLFactor, AlgebraFactor)):
            for term in f.terms:
                t, times = unrepeated(term)  # grouped queries: one block on `times` blocks
                stride = getattr(t, "stride", 1)  # heads interleaved with other rows
                mine = [(s, off) for s, off in zip(kern.slots, offsets) if s.weight == t.param]
                if not mine:
                    continue
                if t.axis != mine[0][0].out_axis:
                    return None
                if getattr(t, "rows", None) is not None:  # heads on listed rows
                    listed = _listed_moves(f, t, times, mine)
                    if listed is None:
                        return None
                    moved += listed
                    continue
                end = t.offset + ((f.b * times - 1) * stride + 1) * f.d
                inside = [(s, off) for s, off in mine if s.start <= t.offset and end <= s.stop]
                if not inside:
                    if all(end <= s.start or s.stop <= t.offset for s, _ in mine):
                        continue  # rows no slot holds (a cross-attention's keys): untouched
                    # the unrotated rows of key heads under rotary: as for listed rows
                    piece = _listed_moves(f, t, times, mine)
                    if piece is None:
                        return None
                    moved += piece
                    continue
                s, off = inside[0]
                moved += block_moves(f.name, t.mode, off + t.offset - s.start, f.d, times, stride)
            continue
        if isinstance(f, OrthogonalFactor):  # a stream rotation turning the readers' rows
            turned = _rotation_moves(f, kern.slots, offsets)
            if turned is None:
                return None
            moved += turned
            continue
        if not hasattr(f, "terms"):
            return None
        m = torch.full((k.n,), unscaled_index(f), dtype=torch.long)
        power = None
        try:
            for s, off in zip(kern.slots, offsets):
                got = _row_scaling(f, s, kern.ln, kern.features)
                if got is None:
                    continue
                idx, p = got
                if power not in (None, p):
                    return None
                power = p
                m[off : off + s.size] = idx
        except _Unsupported:
            return None
        if power is not None:
            scaled.append((f.name, m, power))
    return dataclasses.replace(k, scaled_by=tuple(scaled), moved_by=tuple(moved))


def _rotation_moves(f: OrthogonalFactor, slots: list, offsets: list) -> list[tuple] | None:
    """The `moved_by` declarations of a stream rotation `Q` whose terms turn rows of the
    kernel's readers (`W ↦ Qᵀ W` on rows `start:stop`): the kernel's vector `u` on those rows
    becomes `Qᵀ u` (mode `"T"`). `None` when a turned block straddles a slot's rows or turns
    another axis than the slot's output axis (the kernel is then left out). Turned columns
    (`(1/γ)ᵀ` conjugated by a rotation that fixes `1`) commute with the kernel."""
    moved = []
    for term in f.terms:
        mine = [(s, off) for s, off in zip(slots, offsets) if s.weight == term.param]
        if not mine:
            continue
        if isinstance(term, RotateRows):
            start, stop, axis = 0, f.d, 0
        elif isinstance(term, RotateBlock):
            start, stop, axis = term.start, term.stop, term.axis
        else:  # the readers' columns: `1ᵀ` is kept by a rotation fixing it, as before
            continue
        inside = [(s, off) for s, off in mine if s.start <= start and stop <= s.stop]
        if not inside:
            if all(stop <= s.start or s.stop <= start for s, _ in mine):
                continue  # rows no slot holds
            return None
        s, off = inside[0]
        if axis != s.out_axis:
            return None
        moved.append((f.name, "T", off + start - s.start))
    return moved


def _positions(mine: list[tuple[ReaderSlot, int]], size: int) -> Tensor:
    """Per row `< size` of a reader, its entry in the kernel's element (`mine`: the slots on
    that reader with their offsets in the element); `-1` where no slot holds the row."""
    pos = torch.full((size,), -1, dtype=torch.long)
    for s, off in mine:
        lo, hi = min(s.start, size), min(s.stop, size)
        if lo < hi:
            pos[lo:hi] = torch.arange(off, off + hi - lo)
    return pos


def _listed_moves(
    f: AbstractFactor, t: object, times: int, mine: list[tuple[ReaderSlot, int]]
) -> list[tuple] | None:
    """The `moved_by` declarations for the matrix term `t` whose blocks sit on listed rows
    (`MatTerm.rows`), or whose blocks the slots hold only in part (`MatTerm.index` either
    way): the kernel element's entries of each block's rows, one declaration per
    repetition (`times`). Every block holds the same coordinates `sel` in the slots;
    when only some (a key projection under rotary: the unrotated part of each head), the
    factor's algebra must map `span(sel)` and its complement to themselves. `[]` when no
    slot holds the rows; `None` when the blocks hold different coordinates or the algebra
    mixes held and unheld ones."""
    d = f.d
    index = t.index(f.b * times, d)  # (b·times, d)
    # (b·times, d) entries in the kernel's element, -1: not held
    at = _positions(mine, int(index.max()) + 1)[index]
    held = at >= 0
    if not bool(held.any()):
        return []
    if not bool((held == held[:1]).all()):
        return None
    keep = held[0].nonzero().reshape(-1)
    if int(keep.numel()) == d:
        return [(f.name, t.mode, at[r::times]) for r in range(times)]
    if not (isinstance(f, AlgebraFactor) and f.keeps_apart(held[0])):
        return None  # all of gl(d), or an algebra mixing held and unheld coordinates
    return [(f.name, t.mode, at[r::times][:, keep], None, keep) for r in range(times)]


def _conjugate(p: PermutationFactor, kernels: list[LayerNormKernelFactor]) -> PermutationFactor:
    """`p` carrying the kernels' entries of the rows it permutes: per item, the element
    entries of its rows that slots hold (the same pattern in every item; a permutation of
    rows only partly held in another pattern is not conjugated)."""
    extra = []
    for k in kernels:
        parts = []
        for t in p.terms:
            mine = [
                (s, off)
                for s, off in zip(k.kernel.slots, k.kernel.offsets)
                if t.param == s.weight and t.axis == s.out_axis
            ]
            if not mine:
                continue
            e = t.entries
            mapped = _positions(mine, int(e.max()) + 1)[e]
            held = mapped >= 0
            if bool(held.any()) and bool((held == held[:1]).all()):
                parts.append(mapped[held].reshape(e.shape[0], -1))
        if parts:
            extra.append((k.name, torch.cat(parts, dim=1)))
    if not extra:
        return p
    return dataclasses.replace(p, conjugates=(*p.conjugates, *extra))


def link_kernels(factors: list) -> list:
    """Declare, for every `LayerNormKernelFactor` in `factors`, the factors that transform
    its readers' rows (rescalings: `scaled_by`; row-block `GL`: `moved_by`) and add it to
    the conjugates of the permutations of those rows. A kernel whose readers are changed
    in a way these rules do not cover (an affine factor, say) is dropped: the group then
    misses those directions, which `certify` reports, rather than acting wrongly."""
    return relink(factors, LayerNormKernelFactor, _link_one, _conjugate)
