"""Embedding lookups and linear maps written as a function call (`F.embedding`,
`F.linear`, their `aten` ops) inside a module of the model's own, seen as the
`nn.Embedding` or `nn.Linear` they compute.

A subclass of `nn.Embedding` or `nn.Linear` whose `forward` computes something else (OPT's
positional table, looked up at `cumsum(mask) + 2`; Gemma's table, scaled by `√d`; a linear
map with something added) is traced into (`_subclass_atoms.py`), and its lookup or product
reaches the graph as a function call. The rules for tables and linear maps
(`rules/linear.py`, the embedding sums of `_embeddings.py`, the stream rotations of
`_stream.py`, the rows no index selects of `_unread.py`, the LayerNorm readers) read
`nn.Embedding` and `nn.Linear` modules. As for functional LayerNorms
(`_functional_norms.py`): when a module has no submodules, its parameters are exactly the
call's (`weight` for a lookup, `weight` and `bias` or `weight` alone for a linear map, read
as `get_attr` nodes), and its captured graph holds one such call (`torch.export`; with
`torch.fx`, every such call made inside the module computes the same layer), the call
becomes a `call_module` node on the module's path, fed by the call's input (the indices
the module computed), and the analysis sees the model through a view (`with_modules`) in
which that path holds an `nn.Embedding` or `nn.Linear` over the same parameter objects
(and the module's buffers, which the rest of its computation may read). A lookup with
`max_norm`, which rewrites the table, is left alone. Whatever else the module computes
(the indices, a scaling of the rows looked up, a constant added) stays in the graph as it
is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._functional_norms import calls_by_module, install

__all__ = ["as_layer", "input_of", "traced_layers"]

aten = torch.ops.aten
LOOKUP, LINEAR = aten.embedding.default, aten.linear.default
_OPS = (LOOKUP, LINEAR)
#: the functions `torch.fx` records, by kind
_FUNCTIONAL = {F.embedding: "lookup", torch.embedding: "lookup", F.linear: "linear"}


def as_layer(n: fx.Node, owner: nn.Module, path: str, graph: fx.Graph) -> nn.Module | None:
    """The `nn.Embedding` or `nn.Linear` that the `aten` call `n` computes, when the module
    `owner` at `path` (whose captured graph is `graph`, parameters named relative to it)
    may stand for it; `None` otherwise. The call's input is `input_of(n)`."""
    if n.target not in _OPS or not path:
        return None
    if sum(m.target in _OPS for m in graph.nodes) != 1:
        return None
    return _layer(n, owner, "")


def input_of(n: fx.Node) -> Any:
    """The input of a lookup or linear call: the indices of `aten.embedding(weight, idx)`,
    the first argument otherwise."""
    return n.args[1] if n.target is LOOKUP else n.args[0]


def traced_layers(gm: fx.GraphModule, model: nn.Module) -> dict[str, nn.Module]:
    """In a graph traced by `torch.fx` (parameters named from the model's root), the
    `F.embedding` and `F.linear` calls that their module stands for: each becomes a
    `call_module` node on that module's path, held by `gm`; returns them by path."""
    calls = calls_by_module(gm, lambda n: n.op == "call_function" and n.target in _FUNCTIONAL)
    found: dict[str, nn.Module] = {}
    for path, nodes in calls.items():
        owner = model.get_submodule(path)
        layers = [_layer(n, owner, path + ".") for n in nodes]
        if any(m is None for m in layers) or len({_kind(n) for n in nodes}) != 1:
            continue
        if install(gm, model, path, layers[0], [(n, input_of(n)) for n in nodes]):
            found[path] = layers[0]
    if found:
        gm.recompile()
    return found


def _kind(n: fx.Node) -> str:
    if n.target in _OPS:
        return "lookup" if n.target is LOOKUP else "linear"
    return _FUNCTIONAL[n.target]


def _layer(n: fx.Node, owner: nn.Module, prefix: str) -> nn.Module | None:
    """The layer of the call `n` when `owner` has no submodules and its parameters are
    exactly the call's (`get_attr` nodes named `prefix + "weight"`, `prefix + "bias"`),
    or `None`."""
    if next(owner.children(), None) is not None or len(n.args) < 2:
        return None
    if not isinstance(input_of(n), fx.Node):
        return None
    if _kind(n) == "lookup":
        if n.target is LOOKUP:
            weight, bias = n.args[0], None
        else:
            given = {
                **dict(zip(("input", "weight", "padding_idx", "max_norm"), n.args)),
                **n.kwargs,
            }
            if given.get("max_norm") is not None:
                return None
            weight, bias = given["weight"], None
    else:
        given = {**dict(zip(("input", "weight", "bias"), n.args)), **n.kwargs}
        weight, bias = given["weight"], given.get("bias")
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    for key, a in params.items():
        if not (isinstance(a, fx.Node) and a.op == "get_attr" and a.target == prefix + key):
            return None
        if not isinstance(getattr(owner, key, None), nn.Parameter):
            return None
    if {k for k, _ in owner.named_parameters()} != set(params):
        return None
    w = owner.weight
    if w.ndim != 2:
        return None
    if _kind(n) == "lookup":
        layer: nn.Module = nn.Embedding(*w.shape, device="meta")
    else:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        if bias is not None:
            layer.bias = owner.bias
    layer.weight = w
    for name, buf in owner.named_buffers(recurse=False):  # read by the rest of the module
        layer.register_buffer(name, buf, persistent=name not in owner._non_persistent_buffers_set)
    return layer
