"""Parameter entries the captured graph never reads, found from the graph alone.

Three kinds, each a symmetry for every input of the captured shapes:

- nodes whose results reach no output (`_ = self.unused(h)`) are dead: they are erased
  before the analysis (`drop_dead`), so no rule sees them and no symmetry is lost to them;
- a parameter no live node reads (never used, or used only by dead code) is free whole;
- a table that live nodes read only by embedding lookups at *constant* indices (computed
  from literals, buffers and factory functions alone, never from an input or a parameter:
  `arange` over an export-specialized length, a buffer of position ids) is read only at the
  rows those indices select; its other rows are free. Indices derived from an input (token
  ids, or a length read from an input's shape in a `torch.fx` graph, which is not
  specialized) select rows the analysis cannot bound: nothing is claimed there.

A `torch.export` graph is specialized to the shapes (and omitted optional inputs) of the
example: a position table read up to the example's length has its later rows free *for
inputs of that length*. `symmetries` therefore claims rows only for inputs the caller gave
(`rows=True`), never for inputs it inferred itself.

Conservative throughout: a node that mutates (in-place ops, `setitem`, `inplace=True`
modules, impure nodes) is live, a constant that anything mutates is no constant, random
and uninitialized factories are no constants, and a table read in any other way (a custom
forward touching the weight beyond `F.embedding`, `max_norm`) is read whole.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Unread", "drop_dead", "unread_entries"]

aten = torch.ops.aten

_INPLACE_OPERATORS = {
    operator.setitem,
    operator.delitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.imatmul,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
}
_INPLACE_METHODS = {f"__{o.__name__}__" for o in _INPLACE_OPERATORS}
#: `operator` functions whose names end in `_` but compute a new value
_PURE_OPERATORS = {operator.and_, operator.or_, operator.not_}
#: factories whose values are random or uninitialized: never constants
_RANDOM = (
    "rand",
    "bernoulli",
    "dropout",
    "normal",
    "uniform",
    "multinomial",
    "poisson",
    "empty",
    "exponential",
    "geometric",
    "cauchy",
    "seed",
)
#: embedding lookups: the positions of `(index, table)` among their arguments
_LOOKUPS = {F.embedding: (0, 1), torch.embedding: (1, 0), aten.embedding.default: (1, 0)}


def _name(target: Any) -> str:
    return str(getattr(target, "__name__", target))


def _mutates(n: fx.Node, root: nn.Module) -> bool:
    """Whether `n` writes into a tensor besides computing its result."""
    if n.op == "call_function":
        t = n.target
        if t in _INPLACE_OPERATORS:
            return True
        if isinstance(t, torch._ops.OpOverload):
            return t._schema.is_mutable
        name = _name(t)
        return name.endswith("_") and not name.startswith("__") and t not in _PURE_OPERATORS
    if n.op == "call_method":
        name = str(n.target)
        dunder = name.startswith("__") and name.endswith("__")
        return (name.endswith("_") and not dunder) or name in _INPLACE_METHODS
    if n.op == "call_module":
        m = root.get_submodule(str(n.target))
        updates = m.training and next(m.buffers(), None) is not None  # running statistics
        return bool(getattr(m, "inplace", False)) or updates
    return False


def _has_effect(n: fx.Node, root: nn.Module) -> bool:
    """Whether `n` does anything besides computing its result (a mutation, an assertion)."""
    return n.op in ("call_function", "call_method", "call_module") and (
        _mutates(n, root) or n.is_impure()
    )


def drop_dead(gm: fx.GraphModule) -> int:
    """Erase the nodes of `gm` whose results reach no output and that mutate nothing;
    returns how many were erased. Inputs stay (they are the graph's signature)."""
    nodes = list(gm.graph.nodes)
    live: set[fx.Node] = set()
    stack = [n for n in nodes if n.op in ("output", "placeholder") or _has_effect(n, gm)]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    dead = [n for n in reversed(nodes) if n not in live]
    for n in dead:  # users before producers: every user of a dead node is dead
        gm.graph.erase_node(n)
    if dead:
        gm.recompile()
    return len(dead)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _ancestors(n: fx.Node, within: set[fx.Node]) -> set[fx.Node]:
    out: set[fx.Node] = set()
    stack = [a for a in n.all_input_nodes if a in within]
    while stack:
        a = stack.pop()
        if a not in out:
            out.add(a)
            stack.extend(x for x in a.all_input_nodes if x in within)
    return out


def _constants(gm: fx.GraphModule, params: set[int]) -> dict[fx.Node, Any]:
    """The values of the nodes computed from literals, buffers and deterministic factories
    alone (no input, no parameter, no module call). An in-place op among such nodes is one
    of them (evaluated in graph order, as the graph runs) unless it writes into what a
    buffer holds; any other mutation leaves out every constant it reaches."""
    nodes = list(gm.graph.nodes)
    const: set[fx.Node] = set()
    for n in nodes:
        if n.op == "get_attr":
            obj = _fetch(gm, str(n.target))
            if not isinstance(obj, nn.Parameter) and id(obj) not in params:
                const.add(n)
        elif n.op in ("call_function", "call_method"):
            if any(w in _name(n.target).lower() for w in _RANDOM):
                continue
            if not all(a in const for a in n.all_input_nodes):
                continue
            if _mutates(n, gm) and any(a.op == "get_attr" for a in _ancestors(n, const)):
                continue
            const.add(n)
    # a constant that another mutation reaches may hold other values than computed here
    tainted: set[fx.Node] = set()
    stack = [
        a
        for n in nodes
        if _mutates(n, gm) and n not in const
        for a in n.all_input_nodes
        if a in const
    ]
    while stack:
        a = stack.pop()
        if a not in tainted:
            tainted.add(a)
            stack.extend(x for x in a.all_input_nodes if x in const)
    # and so does every read of the same attribute (fx reads a folded constant once per use)
    written = {id(_fetch(gm, str(a.target))) for a in tainted if a.op == "get_attr"}
    tainted |= {a for a in const if a.op == "get_attr" and id(_fetch(gm, str(a.target))) in written}
    values: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for n in nodes:
            if n not in const or n in tainted:
                continue
            if any(a not in values for a in n.all_input_nodes):
                continue  # downstream of a tainted or failed constant
            args = fx.node.map_arg(n.args, values.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, values.__getitem__)
            try:
                if n.op == "get_attr":
                    values[n] = _fetch(gm, str(n.target))
                elif n.op == "call_method":
                    values[n] = getattr(args[0], str(n.target))(*args[1:], **kwargs)
                else:
                    values[n] = n.target(*args, **kwargs)
            except Exception:  # an op that does not run outside the graph: not constant
                continue
    return values


class _Lookups(TorchFunctionMode):
    """Records the rows `weight` is looked up at; `other` when it is used in any other way."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight, self.rows, self.other = weight, [], False

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        leaves = [*args, *kwargs.values()]
        if any(a is self.weight for a in leaves):
            rows = _lookup_rows(func, args, kwargs, self.weight)
            if rows is None:
                self.other = True
            else:
                self.rows.append(rows)
        return func(*args, **kwargs)


def _lookup_rows(func: Any, args: tuple, kwargs: dict, weight: Any) -> Tensor | None:
    """The rows an embedding lookup `func(*args, **kwargs)` of `weight` selects (the index
    being a concrete tensor), or `None` when it is no such lookup."""
    if func not in _LOOKUPS:
        return None
    i_idx, i_w = _LOOKUPS[func]
    if len(args) <= max(i_idx, i_w) or args[i_w] is not weight or args[i_idx] is weight:
        return None
    max_norm = kwargs.get("max_norm", args[3] if func is F.embedding and len(args) > 3 else None)
    idx = args[i_idx]
    if max_norm is not None or not isinstance(idx, Tensor) or idx.is_floating_point():
        return None
    if idx.device.type == "meta":  # shapes only: the rows are unknown
        return None
    return idx.reshape(-1).unique()


def _module_rows(m: nn.Embedding, args: tuple, kwargs: dict) -> Tensor | None:
    """The rows module `m` reads on constant inputs: its forward run on them, recording
    every use of its weight (`None` unless all are lookups)."""
    if m.max_norm is not None:
        return None
    rec = _Lookups(m.weight)
    try:
        with torch.no_grad(), rec:
            m(*args, **kwargs)
    except Exception:
        return None
    if rec.other or not rec.rows:
        return None
    return torch.cat(rec.rows).unique()


@dataclass(frozen=True)
class Unread:
    """What the graph never reads: `whole` parameters (by name) and `rows`, `{name: rows}`
    of tables read only at other rows (`(k,)` long, sorted; `k ≥ 1`)."""

    whole: tuple[str, ...]
    rows: dict[str, Tensor]

    def read_rows(self, name: str, n_rows: int) -> Tensor | None:
        """The rows of `name` the graph reads, or `None` when it may read all of them."""
        if name not in self.rows:
            return None
        keep = torch.ones(n_rows, dtype=torch.bool)
        keep[self.rows[name]] = False
        return keep.nonzero().reshape(-1)


def unread_entries(gm: fx.GraphModule, model: nn.Module, *, rows: bool = True) -> Unread:
    """The entries of `model`'s parameters that the live nodes of `gm` never read (run
    `drop_dead` first). Parameters are matched by identity (a tied weight is one
    parameter, named as `model.named_parameters()` names it). `rows=False`: whole
    parameters only (a table looked up at constant indices counts as read whole)."""
    names = {id(p): n for n, p in model.named_parameters()}
    values = _constants(gm, set(names)) if rows else {}
    whole_read: set[int] = set()
    found_rows: dict[int, list[Tensor]] = {}

    def is_const(a: Any) -> bool:
        return all(x in values for x in _nodes_in(a))

    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            own = list(m.parameters())
            looked = None
            if rows and isinstance(m, nn.Embedding) and is_const(n.args) and is_const(n.kwargs):
                # copies: a custom forward may write into its inputs (buffers among them)
                args = fx.node.map_arg(n.args, lambda x: _copy(values[x]))
                kwargs = fx.node.map_arg(n.kwargs, lambda x: _copy(values[x]))
                looked = _module_rows(m, tuple(args), dict(kwargs))
            for p in own:
                if looked is not None and p is m.weight:
                    found_rows.setdefault(id(p), []).append(looked)
                else:
                    whole_read.add(id(p))
        elif n.op == "get_attr":
            obj = _fetch(gm, str(n.target))
            if id(obj) not in names:
                continue
            found = [_node_rows(u, n, values) for u in n.users] if rows else [None]
            if found and all(r is not None for r in found):
                found_rows.setdefault(id(obj), []).extend(r for r in found if r is not None)
            else:
                whole_read.add(id(obj))
    whole = tuple(name for i, name in names.items() if i not in whole_read and i not in found_rows)
    partial: dict[str, Tensor] = {}
    for i, found in found_rows.items():
        if i in whole_read:
            continue
        p = model.get_parameter(names[i])
        read = torch.zeros(p.shape[0], dtype=torch.bool)
        idx = torch.cat(found)
        if (idx < 0).any() or (idx >= p.shape[0]).any():
            continue  # an index torch would refuse: claim nothing
        read[idx] = True
        if not read.all():
            partial[names[i]] = (~read).nonzero().reshape(-1)
    return Unread(whole, partial)


def _copy(v: Any) -> Any:
    return v.clone() if isinstance(v, Tensor) else v


def _nodes_in(a: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(a, out.append)
    return out


def _node_rows(user: fx.Node, weight: fx.Node, values: dict[fx.Node, Any]) -> Tensor | None:
    """The rows `user` reads of the table `weight` (a `get_attr` node): an embedding
    function at a constant index; `None` for any other use."""
    if user.op != "call_function" or user.target not in _LOOKUPS:
        return None
    if weight in _nodes_in(user.kwargs) or any(a not in values for a in _index_nodes(user)):
        return None
    args = fx.node.map_arg(user.args, lambda x: weight if x is weight else values[x])
    kwargs = fx.node.map_arg(user.kwargs, lambda x: values[x])
    return _lookup_rows(user.target, tuple(args), dict(kwargs), weight)


def _index_nodes(user: fx.Node) -> list[fx.Node]:
    """The nodes `user` reads besides its table."""
    i_w = _LOOKUPS[user.target][1]
    rest = [a for k, a in enumerate(user.args) if k != i_w]
    return _nodes_in((rest, user.kwargs))
