"""Residual streams found in the graph, and their orthogonal symmetry.

Starting from each embedding lookup, the stream is followed through the graph: casts keep
it, a residual sum with the output of a linear map (that nothing else reads) extends it and
records that map as a writer, and an RMS normalization reads it: `x · rsqrt(mean(x²) + ε)`
(the per-token factor computed from the stream alone), then a per-feature gain `γ`, whose
product only linear maps read. Any other use (the model's output, a LayerNorm, a
nonlinearity) means the stream's basis is seen, and no rotation is claimed.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from ..groups import PermutationFactor
from ..groups._orthogonal import ConjugatedColumns, OrthogonalFactor, RotateColumns, RotateRows
from ._linear import param_name
from ._ops import CASTS, METADATA_OPS, graph_users

__all__ = ["stream_rotations", "with_rotations"]

aten = torch.ops.aten
_ADD = {torch.add, operator.add, aten.add.Tensor}
_MUL = {torch.mul, operator.mul, aten.mul.Tensor}
_NORM_OPS = {aten.pow.Tensor_Scalar, torch.mean, aten.mean.dim, aten.rsqrt.default, *_ADD}


class _NotAStream(Exception):
    pass


def stream_rotations(gm: fx.GraphModule, root: nn.Module, values: dict[fx.Node, Any]) -> list:
    """One `OrthogonalFactor` per residual stream that admits it."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(root.get_submodule(str(n.target)), nn.Embedding):
            continue
        try:
            f = _follow(n, root)
        except _NotAStream:
            continue
        if f is not None:
            out.append(f)
    return out


def with_rotations(factors: list, rotations: list[OrthogonalFactor]) -> list:
    """`factors` plus `rotations`, without the permutations of the rotated streams (they are
    rotations too, and would not compose with the orthogonal element by reindexing)."""
    if not rotations:
        return factors
    tables = {r.table for r in rotations}
    kept = [
        f
        for f in factors
        if not (
            isinstance(f, PermutationFactor)
            and any(t.param in tables and t.axis == 1 for t in f.terms)
        )
    ]
    return kept + rotations


def _module(root: nn.Module, n: Any) -> nn.Module | None:
    if isinstance(n, fx.Node) and n.op == "call_module":
        return root.get_submodule(str(n.target))
    return None


def _follow(emb: fx.Node, root: nn.Module) -> OrthogonalFactor | None:
    table = f"{emb.target}.weight"
    d = root.get_submodule(str(emb.target)).embedding_dim
    stream, frontier = {emb}, [emb]
    writers: list[str] = []
    readers: list[tuple[str, str]] = []  # (reader weight, gain)
    while frontier:
        n = frontier.pop()
        for u in list(n.users):
            if u in stream or (u.op == "call_function" and u.target in METADATA_OPS):
                continue
            if u.op == "output":
                raise _NotAStream(u.name)
            if u.op == "call_function" and u.target in CASTS:
                stream.add(u)
                frontier.append(u)
            elif u.op == "call_function" and u.target in _ADD:
                other = u.args[1] if u.args[0] is n else u.args[0]
                m = _module(root, other)
                if other in stream:
                    pass
                elif isinstance(m, nn.Linear) and len(other.users) == 1 and m.out_features == d:
                    writers.append(str(other.target))
                else:
                    raise _NotAStream(u.name)
                stream.add(u)
                frontier.append(u)
            elif u.op == "call_function" and u.target is aten.pow.Tensor_Scalar:
                if u.args[1] != 2:
                    raise _NotAStream(u.name)
            elif u.op == "call_function" and u.target in _MUL:
                readers += _rms_readers(u, n, root, d)
            else:
                raise _NotAStream(u.name)
    if not readers:
        return None
    terms: list = [RotateColumns(table)]
    for w in writers:
        terms.append(RotateRows(f"{w}.weight"))
        if root.get_submodule(w).bias is not None:
            terms.append(RotateRows(f"{w}.bias"))
    terms += [ConjugatedColumns(w, g) for w, g in readers]
    touched = [t.param for t in terms]
    if len(set(touched)) != len(touched):
        return None  # a tied table read and written: the two actions disagree
    mods = tuple(dict.fromkeys(p.rpartition(".")[0] for p in touched))
    return OrthogonalFactor(
        f"rotation:{emb.target}", d, terms=tuple(terms), modules=mods, table=table
    )


def _rms_readers(mul: fx.Node, x: fx.Node, root: nn.Module, d: int) -> list[tuple[str, str]]:
    """`x · r` with `r = rsqrt(mean(x²) + ε)` computed from `x` alone, then `γ ·`, then only
    linear maps: the `(reader weight, γ)` pairs."""
    r = mul.args[1] if mul.args[0] is x else mul.args[0]
    if not _from_norm(r, x):
        raise _NotAStream
    n = _skip_casts(mul)
    users = graph_users(n)
    gains = [u for u in users if u.op == "call_function" and u.target in _MUL]
    if len(users) != 1 or len(gains) != 1:
        raise _NotAStream(n.name)
    g = gains[0]
    gain = param_name(g.args[0], root) or param_name(g.args[1], root)
    if gain is None or root.get_parameter(gain).shape != (d,):
        raise _NotAStream
    out = []
    g = _skip_casts(g)
    for u in graph_users(g):
        m = _module(root, u)
        if not isinstance(m, nn.Linear) or u.args[0] is not g:
            raise _NotAStream(u.name)
        out.append((f"{u.target}.weight", gain))
    return out


def _skip_casts(n: fx.Node) -> fx.Node:
    while len(graph_users(n)) == 1:
        (u,) = graph_users(n)
        if u.op == "call_function" and u.target in CASTS:
            n = u
        else:
            break
    return n


def _from_norm(r: Any, x: fx.Node) -> bool:
    """`r` is computed from `x` only, by the operations of an RMS normalization."""
    stack, seen = [r], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n is x:
            continue
        if n.op != "call_function" or n.target not in _NORM_OPS | CASTS:
            return False
        stack += list(n.all_input_nodes)
    return x in seen
