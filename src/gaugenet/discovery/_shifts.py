"""Bias shifts that a following layer absorbs: translations found in the graph.

- A bias right before eval-mode BatchNorm: `BN(x + v) = BN(x) + γ v / s` with
  `s = sqrt(var + eps)`, so `b ↦ b + v`, `β ↦ β − γ v / s` changes nothing.
- A LayerNorm's shift `β` read only by affine layers: `β ↦ β + v` with every reader's
  bias `b ↦ b − W v` changes nothing. A residual sum `LN(x) + L(h)` may read it too, when
  the linear layer `L` has a bias that takes `−v` back.

- A bias right before a normalization with per-sample statistics (InstanceNorm, GroupNorm):
  the mean subtraction removes `b ↦ b + v`, per channel, or per group with `v` equal over
  the group's channels; nothing needs to take it back.

The element `v` has one entry per channel of the first layer's output. A shift does not
commute with the rescaling of the same channels (shift then scale = scale then a scaled
shift); the factor declares that rescaling in `scaled_by` and `GaugeGroup` composes the
semidirect product exactly. Two linear maps in a row get the affine group `GA(r)` instead
(`AffineFactor`), which contains both their GL and their shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..groups import TranslationFactor
from ..groups._base import State

__all__ = [
    "AbsorbedShiftFactor",
    "GroupShiftFactor",
    "IntoBatchNorm",
    "IntoLinears",
    "RemovedByNorm",
    "layernorm_shift",
]


@dataclass(frozen=True)
class IntoBatchNorm:
    """`bias += v`, `bn.bias −= bn.weight · v / sqrt(bn.running_var + eps)`."""

    param: str
    bn: str
    eps: float

    def __call__(self, new: State, v: Tensor) -> None:
        gamma = new[f"{self.bn}.weight"]
        s = torch.sqrt(new[f"{self.bn}.running_var"].to(gamma.dtype) + self.eps)
        new[self.param] = new[self.param] + v.to(gamma.dtype)
        new[f"{self.bn}.bias"] = new[f"{self.bn}.bias"] - gamma * v.to(gamma.dtype) / s

    def touched(self) -> tuple[str, ...]:
        return (self.param, f"{self.bn}.bias")


@dataclass(frozen=True)
class RemovedByNorm:
    """`bias += v` repeated over groups of `size` channels: a shift that the next layer's
    mean subtraction removes (InstanceNorm per channel, `size = 1`; GroupNorm per group)."""

    param: str
    size: int = 1

    def __call__(self, new: State, v: Tensor) -> None:
        p = new[self.param]
        new[self.param] = p + v.to(p.dtype).repeat_interleave(self.size)

    def touched(self) -> tuple[str, ...]:
        return (self.param,)


@dataclass(frozen=True)
class IntoLinears:
    """`param += v` (a LayerNorm's `β`) and `bias[rows] −= weight[rows] @ v` for every layer
    reading the LayerNorm's output: `consumers` holds `(weight, bias, rows)`, `rows` a
    `(start, stop)` range or `None` for all rows. A weight named in `transposed` is stored
    `(in, out)` (an `addmm` weight) and its change is `v @ weight`."""

    param: str
    consumers: tuple[tuple[str, str, tuple[int, int] | None], ...]
    #: biases of linear layers added to the LayerNorm's output (a residual sum): `bias −= v`
    residual: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()
    #: readers without a bias, left uncompensated: the factor is kept only if each turns
    #: out to be a softmax attention's key projection (a constant on every key is ignored)
    pending: tuple[str, ...] = ()

    def __call__(self, new: State, v: Tensor) -> None:
        v = v.to(new[self.param].dtype)
        new[self.param] = new[self.param] + v
        for bias in self.residual:
            new[bias] = new[bias] - v
        for weight, bias, rows in self.consumers:
            change = v @ new[weight] if weight in self.transposed else new[weight] @ v
            if rows is not None:
                keep = torch.zeros_like(change)
                keep[rows[0] : rows[1]] = 1
                change = change * keep
            new[bias] = new[bias] - change

    def touched(self) -> tuple[str, ...]:
        return (self.param, *(p for w, b, _ in self.consumers for p in (w, b)), *self.residual)


@dataclass(frozen=True)
class GainIntoLinears(IntoLinears):
    """`IntoLinears` of the shift `γ ⊙ u` (`γ = state[gain] + gain_offset`, the LayerNorm's
    gain): in these coordinates the shift commutes with the LayerNorm's own rescaling and a
    rotation of its stream moves `u` by `Qᵀ` alone, whatever `γ` is."""

    gain: str = ""
    #: `γ` is read as `state[gain] + gain_offset` (a gain stored with an offset)
    gain_offset: float = 0.0

    def effective_gain(self, state: State) -> Tensor:
        return state[self.gain] + self.gain_offset

    def __call__(self, new: State, v: Tensor) -> None:
        super().__call__(new, v.to(new[self.param].dtype) * self.effective_gain(new))


class AbsorbedShiftFactor(TranslationFactor):
    """A `TranslationFactor` whose terms move a bias into the next layer."""

    def params(self) -> tuple[str, ...]:
        out: list[str] = []
        for t in self.terms:
            out += list(t.touched())
            if isinstance(t, IntoBatchNorm):
                out += [f"{t.bn}.weight", f"{t.bn}.running_var"]
        return tuple(dict.fromkeys(out))

    def canonical(self, state: State) -> Tensor:
        """The shift that zeroes the bias (BatchNorm's `β` absorbs it): the canonical gauge."""
        t = self.terms[0]
        if isinstance(t, GainIntoLinears):
            return -state[t.param] / t.effective_gain(state)
        return -state[t.param]


class GroupShiftFactor(AbsorbedShiftFactor):
    """Shifts of a bias that a GroupNorm removes: one per group of channels."""

    def canonical(self, state: State) -> Tensor:
        """The shift that zeroes each group's mean bias."""
        term = self.terms[0]
        return -state[term.param].reshape(-1, term.size).mean(1)


def layernorm_shift(
    name: str,
    features: int,
    consumers: list[tuple[str, str, tuple[int, int] | None]],
    residual: list[str],
    transposed: tuple[str, ...] = (),
    pending: tuple[str, ...] = (),
) -> AbsorbedShiftFactor:
    """The shift of the LayerNorm `name`'s `β`, taken back by the `consumers` (see
    `IntoLinears`) and by the `residual` biases."""
    term = IntoLinears(f"{name}.bias", tuple(consumers), tuple(residual), transposed, pending)
    mods = tuple(dict.fromkeys((name, *(w.rpartition(".")[0] for w, _, _ in consumers))))
    return AbsorbedShiftFactor(f"shift:{name}", features, terms=(term,), modules=mods)
