"""Outputs along `1` that a LayerNorm removes: the linear layers feeding it.

A LayerNorm subtracts the mean over its features, so `LN(x + c 1) = LN(x)` for every `c`.
When a linear layer's output reaches a LayerNorm through additions only (a residual sum,
say, and an eval-mode dropout) and nothing else reads that sum, anything the layer adds
along `1` disappears:

    W ↦ W + 1 aᵀ,    b ↦ b + t 1        (a ∈ R^in, t ∈ R)

changes no output. The element is `(a, t)` (`t` only with a bias). Column transformations
of `W` move `a` (`W ↦ W C` maps it to `Cᵀ a`), so the factor declares them in `scaled_by`
/ `moved_by`, and permutations of the columns carry its entries along; transformations of
the rows keep `1` only up to scale and are not allowed (the factor is then dropped).

The value-bias shift of softmax attention (`b_o ↦ b_o − W_o u`) reads the output weight
that this factor changes. When the attention output is centered like this, the shift's
compensation is projected off `1` (the LayerNorm removes that part anyway), which makes the
two factors commute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..groups import AffineFactor, GLFactor, PermutationFactor, TranslationFactor
from ..groups._algebra import AlgebraFactor, block_moves, unrepeated
from ..groups._base import AbstractFactor, State
from ..groups._offset import LayerNormOffsetFactor
from ..groups._orthogonal import OrthogonalFactor
from ._linear import Linear
from ._monomials import unscaled_index
from ._relink import relink

__all__ = [
    "BiasAlongOne",
    "CenteredBiasFactor",
    "CenteredOutputFactor",
    "OnesShift",
    "centered_output",
    "link_centered",
    "without_summed_ones",
]


@dataclass(frozen=True)
class OnesShift:
    """`weight += 1 aᵀ` (`weight`: `(rows, cols)` = `(outputs, inputs)`, `a = v[:cols]`) and
    `bias += v[cols]`; with `out_axis = 1` the weight is stored `(cols, rows)` (an `addmm`
    weight) and gets `a 1ᵀ`."""

    weight: str
    bias: str | None
    rows: int
    cols: int
    out_axis: int = 0

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis

    def __call__(self, new: State, v: Tensor) -> None:
        W = new[self.weight]
        v = v.to(W.dtype)
        shift = v[None, : self.cols].expand(self.rows, self.cols)
        # a convolution's weight `(out, in, k...)` takes the shift over its flattened inputs
        new[self.weight] = W + (shift.reshape(W.shape) if self.out_axis == 0 else shift.T)
        if self.bias is not None:
            new[self.bias] = new[self.bias] + v[self.cols]


class CenteredOutputFactor(TranslationFactor):
    """`R^(in + 1)` (or `R^in` without bias): the part along `1` of a layer's output that a
    LayerNorm removes."""

    @property
    def shift(self) -> OnesShift:
        return self.terms[0]

    def params(self) -> tuple[str, ...]:
        s = self.shift
        return (s.weight,) if s.bias is None else (s.weight, s.bias)

    def canonical(self, state: State) -> Tensor:
        """The shift that centers every column of `W` and the bias (mean zero over the
        outputs): column transformations keep it, so it is the canonical gauge."""
        s = self.shift
        W = state[s.weight]
        parts = [-(W.reshape(W.shape[0], -1) if s.out_axis == 0 else W.T).mean(0)]
        if s.bias is not None:
            parts.append(-state[s.bias].mean().reshape(1))
        return torch.cat(parts)


def centered_output(lin: Linear, root: nn.Module) -> CenteredOutputFactor:
    """The factor of the linear map `lin` whose output along `1` is removed."""
    rows, cols = lin.shape(root)
    term = OnesShift(lin.weight, lin.bias, rows, cols, lin.out_axis)
    return CenteredOutputFactor(
        f"center:{lin.name}", cols + (lin.bias is not None), terms=(term,), modules=(lin.name,)
    )


@dataclass(frozen=True)
class BiasAlongOne:
    """`bias += t 1` and `c −= t 1` for every bias `c` in `compensate`: a layer's output
    reaches a LayerNorm, which removes `t 1`, and residual sums, where the linear layers
    owning `compensate` take it back."""

    bias: str
    compensate: tuple[str, ...]
    #: for an attention output projection: `(weight, value bias, offset)`, so that the
    #: canonical gauge reads `b + W b_v`, which the value-bias shift leaves alone
    value: tuple[str, str, int] | None = None

    def __call__(self, new: State, v: Tensor) -> None:
        b = new[self.bias]
        new[self.bias] = b + v.to(b.dtype)
        for c in self.compensate:
            new[c] = new[c] - v.to(new[c].dtype)


class CenteredBiasFactor(TranslationFactor):
    """`R`: a bias shift along `1` removed by a LayerNorm and taken back in residual sums."""

    def params(self) -> tuple[str, ...]:
        t = self.terms[0]
        return (t.bias, *t.compensate)

    def canonical(self, state: State) -> Tensor:
        """The shift giving the bias zero mean; for an attention output, the bias the
        output would have with a zero value bias (`b + W b_v`, unchanged by the value
        shift and the value-output GL), so that the gauge does not depend on them."""
        t = self.terms[0]
        b = state[t.bias]
        if t.value is not None:
            weight, vb, off = t.value
            W = state[weight]
            b = b + W @ state[vb][off : off + W.shape[1]]
        return -b.mean().reshape(1)


def _link_one(f: CenteredOutputFactor, factors: list) -> CenteredOutputFactor | None:
    s = f.shift
    scaled, moved = [], []
    for g in factors:
        if g is f or isinstance(g, PermutationFactor):
            continue
        touched = set(g.params())
        if not touched & set(f.params()):
            continue
        if isinstance(g, TranslationFactor):
            # other shifts commute unless they read the weight this factor changes
            if s.weight not in touched or _is_value_shift_into(g, s):
                continue
            return None
        if isinstance(g, AffineFactor):
            return None
        if isinstance(g, OrthogonalFactor) and g.fixes_ones:
            continue  # a stream rotation keeping `1`: `Qᵀ(b + c 1) = Qᵀ b + c 1`
        if isinstance(g, (GLFactor, AlgebraFactor)):
            for term in g.terms:
                t, times = unrepeated(term)  # grouped queries: one block on `times` blocks
                if t.param == s.bias:
                    return None
                if t.param == s.weight:
                    if t.axis != s.in_axis or getattr(t, "rows", None) is not None:
                        return None  # explicit head columns: not followed here
                    stride = getattr(t, "stride", 1)  # heads interleaved with other columns
                    moved += block_moves(g.name, t.mode, t.offset, g.d, times, stride)
            continue
        if not hasattr(g, "terms"):
            return None
        for t in g.terms:
            if s.bias is not None and getattr(t, "param", None) == s.bias:
                return None
            if getattr(t, "param", None) != s.weight or not hasattr(t, "power"):
                continue
            shape = (s.rows, s.cols) if s.out_axis == 0 else (s.cols, s.rows)
            idx = torch.broadcast_to(t.index, shape)
            if s.out_axis == 1:
                idx = idx.T
            if not bool((idx == idx[:1]).all()):
                return None  # rows rescaled differently: `1` is not kept
            m = torch.full((f.n,), unscaled_index(g), dtype=torch.long)
            m[: s.cols] = idx[0]
            scaled.append((g.name, m, int(t.power)))
    return dataclasses.replace(f, scaled_by=tuple(scaled), moved_by=tuple(moved))


def _is_value_shift_into(g: TranslationFactor, s: OnesShift) -> bool:
    """A value-bias shift whose compensation goes through this layer (its weight; the
    bias it writes is the layer's own, even where this factor leaves it to a bias move)."""
    return all(getattr(t, "weight", None) == s.weight for t in g.terms) and all(
        hasattr(t, "center") for t in g.terms
    )


def _conjugate(p: PermutationFactor, centered: list[CenteredOutputFactor]) -> PermutationFactor:
    extra = [
        (f.name, t.entries)
        for f in centered
        for t in p.terms
        if t.param == f.shift.weight and t.axis == f.shift.in_axis
    ]
    return dataclasses.replace(p, conjugates=(*p.conjugates, *extra)) if extra else p


def _bias_moved(f: AbstractFactor, factors: list) -> bool:
    """A `CenteredBiasFactor` whose biases another (non-shift) factor transforms: `t 1`
    would not stay along `1`, so the factor is dropped. A LayerNorm offset only subtracts
    from the biases it touches, which keeps `t 1` (whether the two commute is settled by
    `link_offsets`, which drops the offset where the shift reads what it moves)."""
    if not isinstance(f, CenteredBiasFactor):
        return False
    mine = set(f.params())
    return any(
        not isinstance(g, (TranslationFactor, PermutationFactor, LayerNormOffsetFactor))
        and mine & set(g.params())
        for g in factors
    )


def _center_value_shift(g: object, kept: list[CenteredOutputFactor]) -> object:
    """A value-bias shift into a centered layer, with its compensation projected off `1`."""
    layers = {f.shift.weight for f in kept}
    if isinstance(g, TranslationFactor) and any(
        getattr(t, "weight", None) in layers and hasattr(t, "center") for t in g.terms
    ):
        return dataclasses.replace(
            g, terms=tuple(dataclasses.replace(t, center=True) for t in g.terms)
        )
    return g


def link_centered(factors: list) -> list:
    """Declare the column transformations of every `CenteredOutputFactor`'s layer, let the
    column permutations carry it, and center the value-bias shifts of attention outputs it
    covers. A factor whose layer is transformed otherwise is dropped (its directions then
    show up as unexplained in `certify`, never as a wrong action)."""
    factors = [f for f in factors if not _bias_moved(f, factors)]
    return relink(factors, CenteredOutputFactor, _link_one, _conjugate, _center_value_shift)


def without_summed_ones(factors: list) -> list:
    """`factors` without the bias entry of a `CenteredOutputFactor` that a bias move makes
    redundant. Two writers whose biases are only summed (`summed_bias`, a move `v` into
    `b_B` out of `b_A`) and whose outputs are both centered each shift their bias along `1`;
    with the move along `1` that is three directions in a plane, so the shift of `b_B`
    (the bias the move goes into) is left to the other two. Call before `link_centered`."""
    moves = [
        t
        for f in factors
        if isinstance(f, TranslationFactor)
        for t in getattr(f, "terms", ())
        if hasattr(t, "into") and hasattr(t, "out_of")
    ]
    centered = {
        f.shift.bias for f in factors if isinstance(f, CenteredOutputFactor) and f.shift.bias
    }
    drop = {t.into for t in moves if t.into in centered and t.out_of in centered}
    out = []
    for f in factors:
        if isinstance(f, CenteredOutputFactor) and f.shift.bias in drop:
            f = dataclasses.replace(f, n=f.n - 1, terms=(dataclasses.replace(f.shift, bias=None),))
        out.append(f)
    return out
