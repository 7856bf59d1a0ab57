"""Biases that are only ever summed: the shift moved between them.

Two affine layers whose outputs go nowhere but into one residual sum (a ResNet block's main
branch and its projection shortcut, each ending in BatchNorm) add their biases: only
`b₁ + b₂` reaches the rest of the model, so `b₁ ↦ b₁ + v`, `b₂ ↦ b₂ − v` changes nothing,
per channel, whatever reads the sum (a ReLU included). Found in the graph: a tree of
additions, each used only by the next, whose operands include the outputs of at least two
such layers (eval-mode affine BatchNorm, a convolution or linear layer with a bias, seen
through eval-mode dropout), each read by that addition only, of the sum's shape, and all
adding their biases along one axis (a parallel transformer block's attention and MLP
outputs, on the features). With `k` such layers, `k − 1` moves of
one vector per channel (`SummedBiasFactor`, one per layer after the first; its canonical
form holds the whole sum in the first layer's bias).

A move scales with the rescaling of the summed channels (shift then scale = scale then a
scaled shift): the factor declares it in `scaled_by`, and each permutation of those
channels re-indexes it (its `conjugates`).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..groups import PermutationFactor, RescalingFactor
from ..groups._base import State
from ..groups._rescaling import Scale
from ._ops import graph_users, passes_input
from .rules.recurrent import BiasDifferenceFactor, BiasMove

__all__ = ["SummedBiasFactor", "summed_bias_factors", "with_moves"]

_ADD = {torch.add, operator.add, operator.iadd, torch.ops.aten.add.Tensor}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNELS_FIRST = (*_BN, nn.modules.conv._ConvNd)


class SummedBiasFactor(BiasDifferenceFactor):
    """`R^c`: a bias moved between two affine layers whose outputs are only summed."""

    def canonical(self, state: State) -> Tensor:
        """The shift zeroing the second layer's bias (the sum held by the first): `(c,)`.
        A zero is kept by every linear map of those channels (rescalings, permutations)
        and by the gauges other factors impose on the first layer's bias alone (centering
        it along `1`, say), so the gauges meet in one pass, whatever the order."""
        t = self.terms[0]
        return -state[t.into][: self.n]


def _is_add(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _ADD and not n.kwargs and len(n.args) == 2


def _writer(n: object, root: nn.Module, shape: torch.Size, values: dict) -> tuple[str, int] | None:
    """`(module name, channel axis)` of `n` when it is an affine layer with a bias of one
    entry per channel of a sum of `shape` (seen through eval-mode dropout), read by nothing
    else; otherwise `None`."""
    while isinstance(n, fx.Node) and passes_input(n, root) and len(graph_users(n)) == 1:
        n = n.args[0]
    if not isinstance(n, fx.Node) or n.op != "call_module" or len(graph_users(n)) != 1:
        return None
    m = root.get_submodule(str(n.target))
    out = values.get(n)
    if not isinstance(out, torch.Tensor) or out.shape != shape or out.ndim < 2:
        return None
    if isinstance(m, _BN):
        ok = m.affine and m.track_running_stats and not m.training
    elif isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
        ok = m.bias is not None
    else:
        return None
    axis = 1 if isinstance(m, _CHANNELS_FIRST) else out.ndim - 1
    if not ok or m.bias.shape != (out.shape[axis],):
        return None
    return str(n.target), axis


def _leaves(n: fx.Node) -> list[object]:
    """The operands of the addition tree rooted at `n` (inner additions used only there)."""
    out: list[object] = []
    for a in n.args:
        if isinstance(a, fx.Node) and _is_add(a) and len(graph_users(a)) == 1:
            out += _leaves(a)
        else:
            out.append(a)
    return out


def summed_bias_factors(
    gm: fx.GraphModule,
    root: nn.Module,
    values: dict,
    factors: list,
    shifted: frozenset[str] = frozenset(),
) -> list:
    """`factors` with one `BiasDifferenceFactor` per pair (first, other) of affine layers
    whose biases are only summed (see the module docstring), scaled by the rescalings of
    `factors` and re-indexed by their permutations. Pairs with a bias in `shifted` (each
    shifted on its own already, see `_linear_streams.py`) are left out."""
    moves: list[SummedBiasFactor] = []
    for n in gm.graph.nodes:
        if not _is_add(n):
            continue
        users = graph_users(n)
        if len(users) == 1 and _is_add(users[0]):
            continue  # an inner addition: its root collects it
        out = values.get(n)
        if not isinstance(out, torch.Tensor):
            continue
        found = [w for a in _leaves(n) if (w := _writer(a, root, out.shape, values))]
        if len({axis for _, axis in found}) > 1:
            continue  # biases added along different axes (a convolution and a linear map)
        writers = list(dict.fromkeys(w for w, _ in found))
        if any(f"{w}.bias" in shifted for w in writers):
            continue
        for w in writers[1:]:
            c = root.get_submodule(w).bias.shape[0]
            moves.append(
                SummedBiasFactor(
                    f"summed_bias:{writers[0]}+{w}",
                    c,
                    terms=(BiasMove(f"{w}.bias", f"{writers[0]}.bias"),),
                    modules=(writers[0], w),
                )
            )
    return with_moves(factors, moves, lambda f: f.terms[0].into)


def with_moves(factors: list, moves: list, bias_of: Callable[[Any], str]) -> list:
    """`factors` and the translations `moves`, each declaring the rescalings of the bias it
    moves (`bias_of(move)`: shift then scale = scale then a scaled shift) and re-indexed by
    the permutations of that bias (their `conjugates`)."""
    if not moves:
        return factors
    moves = [_scaled(f, bias_of(f), factors) for f in moves]
    out = [
        _conjugated(f, moves, bias_of) if isinstance(f, PermutationFactor) else f for f in factors
    ]
    return out + moves


def _scaled(f: Any, bias: str, factors: list) -> Any:
    """`f` declaring the rescalings of `bias`."""
    scaled = list(f.scaled_by)
    for r in factors:
        if not isinstance(r, RescalingFactor):
            continue
        t = next((t for t in r.terms if isinstance(t, Scale) and t.param == bias), None)
        if t is not None and t.power == 1:
            scaled.append((r.name, t.index.reshape(-1)))
    return dataclasses.replace(f, scaled_by=tuple(scaled))


def _conjugated(
    p: PermutationFactor, moves: list, bias_of: Callable[[Any], str]
) -> PermutationFactor:
    """`p` re-indexing the moves of the biases it permutes."""
    extra = []
    for f in moves:
        t = next((t for t in p.terms if t.param == bias_of(f) and t.axis == 0), None)
        if t is not None and t.entries.shape[1] == 1:
            extra.append((f.name, t.entries[:, 0]))
    if not extra:
        return p
    return dataclasses.replace(p, conjugates=tuple(p.conjugates) + tuple(extra))
