"""LayerNorms written as a function call: `F.layer_norm` inside a module of the model's own
(OLMo's non-affine norm, a norm with extra casts), seen as the `nn.LayerNorm` it computes.

The LayerNorm rules (`_norm_rules.py`, `_stream.py`, `rules/norms.py`) read `nn.LayerNorm`
modules. When a module has no submodules, its captured graph holds exactly one
`aten.layer_norm` call (`torch.export`; with `torch.fx`, every call made inside the module,
found from the nodes' module stack, computes the same LayerNorm), and the call's `γ` and
`β` are `None` or the module's own `weight` and `bias` (its only parameters; `γ` may be
`weight + c`, a gain stored with an offset, `_offset_layernorm.py`), the call
becomes a `call_module` node on the module's path, and the analysis
sees the model through a view (`with_modules`) in which that path holds an `nn.LayerNorm` of
the same shape, `eps` and parameter objects: every parameter keeps its name, and the
function of the call is the same. Whatever else the module computes (casts around the
call) stays in the graph as it is. The model itself is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._offset_layernorm import OffsetGainLayerNorm, gain_offset, offset_weight

__all__ = ["as_layernorm", "calls_by_module", "install", "traced_layer_norms", "with_modules"]

aten = torch.ops.aten
LAYER_NORM = aten.layer_norm.default


def as_layernorm(n: fx.Node, owner: nn.Module, path: str, graph: fx.Graph) -> nn.LayerNorm | None:
    """The `nn.LayerNorm` that the `aten.layer_norm` call `n` computes, when the module
    `owner` at `path` (whose captured graph is `graph`, parameters named relative to it) may
    stand for it; `None` otherwise."""
    if n.target is not LAYER_NORM or not path:
        return None
    if sum(m.target is LAYER_NORM for m in graph.nodes) != 1:
        return None
    return _layernorm(n, owner, "")


def traced_layer_norms(gm: fx.GraphModule, model: nn.Module) -> dict[str, nn.Module]:
    """In a graph traced by `torch.fx` (parameters named from the model's root), the
    `F.layer_norm` calls that their module stands for: each becomes a `call_module` node on
    that module's path, held by `gm` as an `nn.LayerNorm`; returns them by path. A module
    called several times stands for each call when all compute the same LayerNorm."""
    calls = calls_by_module(gm, lambda n: n.op == "call_function" and n.target in _FUNCTIONAL)
    found: dict[str, nn.Module] = {}
    for path, nodes in calls.items():
        owner = model.get_submodule(path)
        lns = [_layernorm(n, owner, path + ".") for n in nodes]
        if any(ln is None for ln in lns) or len({_spec(ln) for ln in lns}) != 1:
            continue
        if install(gm, model, path, lns[0], [(n, n.args[0]) for n in nodes]):
            found[path] = lns[0]
    if found:
        gm.recompile()
    return found


_FUNCTIONAL = {F.layer_norm, torch.layer_norm}


def _held(gm: nn.Module, path: str) -> nn.Module | None:
    """`gm`'s module at `path`, or `None` where it has none."""
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def calls_by_module(
    gm: fx.GraphModule, keep: Callable[[fx.Node], bool]
) -> dict[str, list[fx.Node]]:
    """The nodes `keep` accepts of a graph traced by `torch.fx`, by the path of the
    innermost module that made them (`nn_module_stack`), in graph order; the root's
    (empty path) left out."""
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack") if keep(n) else None
        if stack:
            path = list(stack.values())[-1][0]
            if path:
                calls.setdefault(path, []).append(n)
    return calls


def install(
    gm: fx.GraphModule,
    model: nn.Module,
    path: str,
    module: nn.Module,
    calls: list[tuple[fx.Node, Any]],
) -> bool:
    """Put `module` at `path` in `gm` and make each `(node, input)` of `calls` a
    `call_module` node on `path` reading `input`; `False`, and nothing changed, where `gm`
    shares the module above `path` with `model` (adding to it would change the model).
    The caller recompiles `gm`."""
    parent = path.rpartition(".")[0]
    if _held(gm, parent) is (model.get_submodule(parent) if parent else model):
        return False
    gm.add_submodule(path, module)
    for n, x in calls:
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(path, (x,))
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    return True


def _spec(ln: nn.LayerNorm) -> tuple:
    return (ln.normalized_shape, ln.eps, id(ln.weight), id(ln.bias), gain_offset(ln))


def _layernorm(n: fx.Node, owner: nn.Module, prefix: str) -> nn.LayerNorm | None:
    """The `nn.LayerNorm` of the call `n` (arguments as `F.layer_norm`'s) when `owner` has
    no submodules and its only parameters are the call's `weight` and `bias` (`get_attr`
    nodes named `prefix + "weight"` and `prefix + "bias"`; the weight may be read as
    `weight + c`, then an `OffsetGainLayerNorm`, see `_offset_layernorm.py`), or `None`."""
    if next(owner.children(), None) is not None or len(n.args) < 2:
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    given = {**dict(zip(names, n.args)), **n.kwargs}
    shape, weight, bias = given["normalized_shape"], given.get("weight"), given.get("bias")
    eps = given.get("eps", 1e-5)
    if isinstance(shape, int):
        shape = (shape,)
    if not (isinstance(shape, (list, tuple)) and all(isinstance(s, int) for s in shape)):
        return None
    if not isinstance(eps, (int, float)) or (bias is not None and weight is None):
        return None
    weight, offset = offset_weight(weight)  # `w + c`: a gain stored with an offset
    used = set()
    for key, a in (("weight", weight), ("bias", bias)):
        if a is None:
            continue
        if not (isinstance(a, fx.Node) and a.op == "get_attr" and a.target == prefix + key):
            return None
        if not isinstance(getattr(owner, key, None), nn.Parameter):
            return None
        used.add(key)
    if {k for k, _ in owner.named_parameters()} != used:
        return None
    kind = OffsetGainLayerNorm if offset else nn.LayerNorm
    ln = kind(
        tuple(shape), eps=float(eps), elementwise_affine=weight is not None, bias=bias is not None
    )
    if offset:
        ln.gain_offset = offset
    if weight is not None:
        ln.weight = owner.weight
    if bias is not None:
        ln.bias = owner.bias
    return ln


def with_modules(model: nn.Module, subs: dict[str, nn.Module]) -> nn.Module:
    """A view of `model` in which each path of `subs` holds its module: the modules on the
    way are shallow copies (their own parameters shared), the model is left unchanged."""
    if not subs:
        return model
    view = _copy(model)
    for path, new in subs.items():
        *owners, name = path.split(".")
        mod = view
        for o in owners:
            child = _copy(mod._modules[o])
            mod._modules[o] = child
            mod = child
        mod._modules[name] = new
    return view


def _copy(m: nn.Module) -> nn.Module:
    c = copy.copy(m)
    c._modules = dict(m._modules)
    return c
