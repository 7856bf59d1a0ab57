"""Position-bias tables seen only by softmax scores: one constant per head is free.

A relative position bias (T5's `relative_attention_bias`, an `nn.Embedding` of
`(buckets, heads)`) is looked up, reshaped to `(1, heads, queries, keys)` and added to the
attention scores, possibly after a mask has been added to it, in every layer that reuses it.
Adding `c_h` to every bucket of head `h` adds `c_h` to all scores of that head, which the
softmax over the keys removes: the table's columns move freely along `1`, one dimension per
head (`ColumnsAlongOne`). Found from the graph: every path from the lookup runs through
views, casts, additions and masking (`where(mask, x, -inf)`) into the additions of some
attention core's scores (or into `scaled_dot_product_attention`'s mask), and the lookup's
last axis is the heads axis of those scores. The group's self-check then verifies it on
the example inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..groups import TranslationFactor
from ..groups._base import State
from ._attention import _SCORE_OPS, _SDPA, _SOFTMAX, _softmax_last
from ._ops import ADDITIONS, CASTS, METADATA_OPS

__all__ = ["ColumnsAlongOne", "score_bias_shifts"]

aten = torch.ops.aten
#: operations that move entries around without mixing them (the heads axis is checked on
#: the values)
_MOVES = {
    aten.permute.default,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.view.default,
    aten.reshape.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.slice.Tensor,
    aten.alias.default,
    torch.permute,
    torch.unsqueeze,
}
_MOVE_METHODS = {"permute", "unsqueeze", "expand", "view", "reshape", "contiguous", "clone"}


@dataclass(frozen=True)
class ColumnsAlongOne:
    """`param[:, h] += v[h]` for a table `(rows, heads)`."""

    param: str

    def __call__(self, new: State, v: Tensor) -> None:
        p = new[self.param]
        new[self.param] = p + v.to(p.dtype)[None, :]


class ScoreShiftFactor(TranslationFactor):
    """`R^heads`: a constant per head added to a position-bias table (see the module doc)."""

    def canonical(self, state: State) -> Tensor:
        """The shift giving every column zero mean: the canonical gauge."""
        return -state[self.terms[0].param].mean(0)


def _score_chain(sm: fx.Node) -> set[fx.Node]:
    """The additions between a softmax and its scores matmul."""
    out, s = set(), sm.args[0]
    while isinstance(s, fx.Node) and s.op == "call_function" and s.target in _SCORE_OPS:
        if s.target in ADDITIONS:
            out.add(s)
        s = s.args[0]
    return out


def _is_move(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _MOVES or n.target in CASTS
    return n.op == "call_method" and str(n.target) in _MOVE_METHODS


def _masks(u: fx.Node, n: fx.Node) -> bool:
    """`where(mask, n, -inf)` (or the most negative float): masked scores stay masked."""
    if u.op != "call_function" or u.target is not aten.where.ScalarOther or u.args[1] is not n:
        return False
    other = u.args[2]
    return isinstance(other, (int, float)) and other <= -1e30


def _reaches_scores_only(
    start: fx.Node, chains: set[fx.Node], sdpa: set[fx.Node], heads: int, values: dict
) -> bool:
    """Every path from `start` ends in a score addition (or an SDPA mask) whose value has
    `heads` on its third axis from the end; only moves, casts and additions on the way."""
    frontier, seen, reached = [start], {start}, False
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen or (u.op == "call_function" and u.target in METADATA_OPS):
                continue
            v = values.get(u)
            if u in chains or (u in sdpa and u.args[0] is not n and n not in u.args[:3]):
                if not (isinstance(v, Tensor) and v.ndim >= 3 and v.shape[-3] == heads):
                    return False
                reached = True
                continue
            if _is_move(u) or (u.op == "call_function" and u.target in ADDITIONS) or _masks(u, n):
                seen.add(u)
                frontier.append(u)
                continue
            return False
    return reached


def score_bias_shifts(
    gm: fx.GraphModule, root: nn.Module, values: dict[fx.Node, Any]
) -> list[ScoreShiftFactor]:
    """One `ScoreShiftFactor` per embedding table `(rows, heads)` read only into softmax
    scores (see the module doc)."""
    chains: set[fx.Node] = set()
    sdpa: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _SDPA:
            sdpa.add(n)
        elif n.target in _SOFTMAX and _softmax_last(n, values):
            chains |= _score_chain(n)
    if not chains and not sdpa:
        return []
    lookups: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(root.get_submodule(str(n.target)), nn.Embedding):
            lookups.setdefault(f"{n.target}.weight", []).append(n)
    out = []
    for table, nodes in lookups.items():
        w = root.get_parameter(table)
        if w.ndim != 2 or w.shape[1] < 1:
            continue
        if all(_reaches_scores_only(n, chains, sdpa, w.shape[1], values) for n in nodes):
            module = table.rpartition(".")[0]
            out.append(
                ScoreShiftFactor(
                    f"scoreshift:{module}",
                    w.shape[1],
                    terms=(ColumnsAlongOne(table),),
                    modules=(module,),
                )
            )
    return out
