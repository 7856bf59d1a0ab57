"""Capturing a model that `torch.fx` cannot trace: `torch.export` (non-strict), flattened
into one graph whose atoms are the model's own atomic modules.

The model is exported with the call signatures of its atomic modules preserved, then
unflattened (`torch.export.unflatten`), which gives a graph per submodule. Those of
non-atomic modules are inlined into one graph; atomic modules stay `call_module` nodes on
the model's own modules, so the module rules of `rules/` apply to them unchanged.
The aten operations in between are renamed to the torch functions of the same meaning
that the function rules know (`aten.add.Tensor` → `torch.add`, ...), and an in-place sum
into a linear layer's fresh output that nothing reads afterwards (`aten.add_`) becomes the
plain sum; any other aten operation is analyzed as unsupported: every label reaching it is
fixed (nothing claimed).
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx._pytree import tree_flatten_spec
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._errors import UnsupportedModelError
from ._functional_layers import as_layer, input_of
from ._functional_norms import as_layernorm
from ._numeric_norms import numeric_layernorm
from ._ops import expand_to, slice_along
from ._trace import is_atomic

__all__ = ["export_graph"]

aten = torch.ops.aten

#: input leaves that `torch.export` keeps as placeholders besides tensors and `None`
_CONSTANT = (torch.Tensor, bool, int, float)

#: aten operations as the torch functions of the same arguments and meaning
_RENAME: dict[Any, Any] = {
    aten.relu.default: torch.relu,
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div,
    aten.cat.default: torch.cat,
    aten.slice.Tensor: slice_along,
    aten.neg.default: torch.neg,
    aten.expand.default: expand_to,
    aten.split.Tensor: torch.split,
    aten.split_with_sizes.default: torch.split,
    aten.chunk.default: torch.chunk,
    aten.unbind.int: torch.unbind,
    aten.view.default: torch.reshape,
    aten.reshape.default: torch.reshape,
    aten.permute.default: torch.permute,
    aten.transpose.int: torch.transpose,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.squeeze.dim: torch.squeeze,
    aten.t.default: torch.t,
    aten.flatten.using_ints: torch.flatten,
    aten.matmul.default: torch.matmul,
    aten.mean.dim: torch.mean,
    aten.sum.dim_IntList: torch.sum,
    aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid,
    aten.gelu.default: F.gelu,
    aten.silu.default: F.silu,
    aten.softmax.int: torch.softmax,
    aten.max_pool2d.default: F.max_pool2d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
}


def _atoms(model: nn.Module) -> tuple[str, ...]:
    """Names of the outermost atomic modules (those not inside another atom)."""
    out: list[str] = []
    for name, m in model.named_modules():
        if name and is_atomic(m) and not any(name.startswith(a + ".") for a in out):
            out.append(name)
    return tuple(out)


def _eval_dropout(n: fx.Node) -> bool:
    """`aten.dropout(x, p, train=False)`: the identity, left out of the graph."""
    if n.target is not torch.ops.aten.dropout.default:
        return False
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train")
    return train is False


def _fresh_inplace_add(n: fx.Node, mod: fx.GraphModule, flat: Any, model: nn.Module) -> bool:
    """`a += b` (`aten.add_`) that may be read as `a + b`: `a` is (`flat`, in the flattened
    graph) the output of an `nn.Linear` (a fresh tensor no one else holds), and this
    addition is the last reader of `a` in the module's graph `mod` (`a` is not returned),
    so nothing sees it mutated (Falcon's `mlp_output += attention_output`)."""
    if n.target is not aten.add_.Tensor or n.kwargs or len(n.args) != 2:
        return False
    a = n.args[0]
    if not (isinstance(a, fx.Node) and isinstance(flat, fx.Node) and flat.op == "call_module"):
        return False
    if not isinstance(model.get_submodule(str(flat.target)), nn.Linear):
        return False
    order = {x: i for i, x in enumerate(mod.graph.nodes)}
    return all(order[u] <= order[n] for u in a.users)


class _Flattener:
    def __init__(self, model: nn.Module, unflat: nn.Module, atoms: set[str]) -> None:
        self.model, self.unflat, self.atoms = model, unflat, atoms
        self.graph = fx.Graph()
        self.attrs: dict[str, Any] = {}
        #: modules calling `F.layer_norm`, `F.embedding` or `F.linear`, or written out as a
        #: LayerNorm, as the module (`nn.LayerNorm`, `nn.Embedding`, `nn.Linear`) they
        #: compute (`None`: a module found to compute no LayerNorm)
        self.norms: dict[str, nn.Module | None] = {}

    def attr(self, path: str) -> fx.Node:
        owner, _, name = path.rpartition(".")
        try:
            obj = getattr(self.model.get_submodule(owner) if owner else self.model, name)
        except AttributeError:  # a constant that export lifted: keep its value
            obj = getattr(self.unflat.get_submodule(owner) if owner else self.unflat, name)
        self.attrs[path] = obj
        return self.graph.get_attr(path)

    def leaves(self, out: Any, spec: Any) -> list[Any]:
        """The leaves of a preserved atom's output, in the order of its output `spec`: a
        `call_module` node returning a tuple (`nn.MultiheadAttention`'s `(output, weights)`)
        is indexed per leaf, so that the caller's `[0]` takes the output, not the tuple."""
        if not isinstance(out, fx.Node) or spec.is_leaf():
            return tree_flatten(out)[0]
        marks = tree_unflatten(list(range(spec.num_leaves)), spec)
        found: dict[int, fx.Node] = {}

        def walk(tree: Any, node: fx.Node) -> None:
            if isinstance(tree, int) and not isinstance(tree, bool):
                found[tree] = node
            elif isinstance(tree, (tuple, list)):
                for i, sub in enumerate(tree):
                    walk(sub, self.graph.call_function(operator.getitem, (node, i)))
            elif isinstance(tree, dict):
                for k, sub in tree.items():
                    walk(sub, self.graph.call_function(operator.getitem, (node, k)))
            elif tree is not None:
                raise UnsupportedModelError(
                    f"output of {out.target} has a structure the capture cannot index: {spec}"
                )

        walk(marks, out)
        return [found[i] for i in range(spec.num_leaves)]

    def layernorm(self, n: fx.Node, mod: fx.GraphModule, prefix: str) -> nn.Module | None:
        """The `nn.LayerNorm` standing for `n` when it is a functional LayerNorm that the
        module being inlined computes (see `_functional_norms.py`)."""
        if not prefix or n.op != "call_function":
            return None
        owner = self.model.get_submodule(prefix[:-1])
        return as_layernorm(n, owner, prefix[:-1], mod.graph)

    def numeric_norm(self, n: fx.Node, mod: fx.GraphModule, path: str) -> nn.Module | None:
        """The `nn.LayerNorm` standing for the call `n` of a module written in primitive
        operations that computes one (`_numeric_norms.py`), called on one tensor."""
        if len(n.args) != 1 or n.kwargs:
            return None
        if path not in self.norms:
            sub = mod.get_submodule(str(n.target))
            graph = getattr(sub, "graph", None)
            owner = self.model.get_submodule(path)
            ln = numeric_layernorm(owner, graph.nodes) if graph else None
            self.norms.setdefault(path, ln)
        return self.norms[path]

    def layer(self, n: fx.Node, mod: fx.GraphModule, prefix: str) -> nn.Module | None:
        """The `nn.Embedding` or `nn.Linear` standing for `n` when it is a functional lookup
        or linear map that the module being inlined computes (see `_functional_layers.py`)."""
        if not prefix or n.op != "call_function":
            return None
        owner = self.model.get_submodule(prefix[:-1])
        return as_layer(n, owner, prefix[:-1], mod.graph)

    def inline(self, mod: fx.GraphModule, prefix: str, args: list[Any]) -> Any:
        env: dict[fx.Node, Any] = {}
        inputs = iter(args)

        def look(a: Any) -> Any:
            return fx.node.map_arg(a, lambda x: env[x])

        for n in mod.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(inputs)
            elif n.op == "output":
                return look(n.args[0])
            elif n.op == "get_attr":
                env[n] = self.attr(prefix + str(n.target))
            elif n.op == "call_module":
                path = prefix + str(n.target)
                if path in self.atoms:
                    self.attrs[path] = self.model.get_submodule(path)
                    env[n] = self.graph.call_module(path, look(n.args), look(n.kwargs))
                elif (ln := self.numeric_norm(n, mod, path)) is not None and (
                    outs := _norm_outputs(mod.get_submodule(str(n.target)))
                ):
                    self.attrs[path] = self.norms[path] = ln
                    x = look(n.args[0])
                    normed = self.graph.call_module(path, (x,))
                    found = [normed if o == "norm" else x for o in outs]
                    env[n] = normed if outs == ("norm",) else tuple(found)
                else:
                    sub = mod.get_submodule(str(n.target))
                    env[n] = self.inline(sub, path + ".", list(look(n.args)))
            elif n.target is tree_flatten_spec:  # the wrapper around a preserved call
                spec = getattr(mod, str(n.args[1].target))
                env[n] = self.leaves(look(n.args[0]), spec)
            elif n.target is tree_unflatten:
                spec = getattr(mod, str(n.args[1].target))
                env[n] = tree_unflatten(list(look(n.args[0])), spec)
            elif n.target is operator.getitem and isinstance(env.get(n.args[0]), (tuple, list)):
                env[n] = env[n.args[0]][n.args[1]]  # an inlined module's tuple output
            elif _eval_dropout(n):
                env[n] = look(n.args[0])  # dropout outside training returns its input
            elif _fresh_inplace_add(n, mod, look(n.args[0]), self.model):
                env[n] = self.graph.call_function(torch.add, look(n.args))
            elif (ln := self.layernorm(n, mod, prefix)) is not None:
                path = prefix[:-1]
                self.attrs[path] = self.norms[path] = ln
                env[n] = self.graph.call_module(path, (look(n.args[0]),))
            elif (layer := self.layer(n, mod, prefix)) is not None:
                path = prefix[:-1]
                self.attrs[path] = self.norms[path] = layer
                env[n] = self.graph.call_module(path, (look(input_of(n)),))
            else:
                target = _RENAME.get(n.target, n.target)
                env[n] = self.graph.call_function(target, look(n.args), look(n.kwargs))
        raise UnsupportedModelError("exported graph has no output")


def _norm_outputs(sub: nn.Module) -> tuple[str, ...] | None:
    """What each output of a module found to compute a LayerNorm is: `("norm",)` for its one
    output; for a tuple, `"norm"` for the normalized one and `"input"` for an output that
    is its input passed through casts to its own dtype (export hands the parent such an
    alias when the parent reads the input again: Cohere's LayerNorm in float32 casts its
    input to float32 and the residual reads it). `None` for any other output."""
    graph = getattr(sub, "graph", None)
    out = next((n for n in graph.nodes if n.op == "output"), None) if graph else None
    if out is None or not isinstance(out.args[0], (tuple, list)):
        return ("norm",)
    kinds = []
    for o in out.args[0]:
        kinds.append("input" if _passed_through(o) else "norm")
    return tuple(kinds) if kinds.count("norm") == 1 else None


def _passed_through(n: Any) -> bool:
    """`n` is a placeholder, or casts of one to its own dtype (no-ops)."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.to.dtype:
        src, val, src_val = n.args[0], n.meta.get("val"), getattr(n.args[0], "meta", {}).get("val")
        if not (isinstance(val, torch.Tensor) and isinstance(src_val, torch.Tensor)):
            return False
        if val.dtype != src_val.dtype:
            return False
        n = src
    return isinstance(n, fx.Node) and n.op == "placeholder"


def _export(model: nn.Module, args: tuple, kwargs: dict[str, Any], atoms: tuple[str, ...]):
    with _no_stack_traces():
        ep = torch.export.export(
            model, args, kwargs, strict=False, preserve_module_call_signature=atoms
        )
        return torch.export.unflatten(ep)


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Capture without the source stack trace of every node (`torch.fx.config`, where this
    torch has it): nothing here reads them, and collecting them is about a fifth of the
    capture of a large model."""
    config = getattr(torch.fx, "config", None)
    if config is None or not hasattr(config, "do_not_emit_stack_traces"):
        yield
        return
    before = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def _holds_state(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None or next(m.buffers(), None) is not None


def export_graph(
    model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[fx.GraphModule, tuple]:
    """`(graph module, flat inputs)`: `model` captured with `torch.export` (non-strict) as
    one graph whose atomic modules are `call_module` nodes; run it on the flat inputs. The
    graph module's `layer_norms` holds the modules whose `F.layer_norm` (or `F.embedding`,
    `F.linear`: `_functional_layers.py`) call became such a
    node, as `nn.LayerNorm`s by path (`_functional_norms.py`).

    Raises `UnsupportedModelError` when the export fails.
    """
    atoms = _atoms(model)
    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        # the fused fast path of `nn.TransformerEncoderLayer` (taken under `no_grad`) is one
        # opaque op; its reference path is the same function in ops the rules know
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                unflat = _export(model, args, kwargs, atoms)
            except Exception:
                # `unflatten` loses a preserved call that computes nothing (ModernBERT's
                # `nn.Identity` norm of its first layer): atoms without parameters or
                # buffers are inlined instead, as the operations they compute
                held = tuple(a for a in atoms if _holds_state(model.get_submodule(a)))
                if held == atoms:
                    raise
                atoms = held
                unflat = _export(model, args, kwargs, atoms)
    except Exception as exc:  # export raises many types; all mean "cannot capture"
        raise UnsupportedModelError(
            f"cannot capture {type(model).__name__} with torch.export: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    placeholders = [n for n in unflat.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat):
        # inputs given as None (an optional positional input) keep their placeholder
        flat = [a for a in _leaves((args, kwargs)) if a is None or isinstance(a, torch.Tensor)]
    if len(placeholders) != len(flat):
        # and so do flags and numbers (`use_cache=False`), whose value export specialized
        flat = [a for a in _leaves((args, kwargs)) if a is None or isinstance(a, _CONSTANT)]
    if len(placeholders) != len(flat):
        raise UnsupportedModelError(
            f"{type(model).__name__}: the exported graph takes {len(placeholders)} inputs, "
            f"the example inputs hold {len(flat)} tensors"
        )
    fl = _Flattener(model, unflat, set(atoms))
    env = [fl.graph.placeholder(f"input_{i}") for i in range(len(flat))]
    out = fl.inline(unflat, "", env)
    fl.graph.output(out)
    gm = fx.GraphModule(_Root(model, fl.attrs), fl.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    # the view to analyze the graph in (`with_modules`)
    gm.layer_norms = {k: v for k, v in fl.norms.items() if v is not None}
    return gm, tuple(flat)


def _leaves(tree: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts, `None` included (in order)."""
    if isinstance(tree, (tuple, list)):
        return [x for t in tree for x in _leaves(t)]
    if isinstance(tree, dict):
        return [x for t in tree.values() for x in _leaves(t)]
    return [tree]


class _Root(nn.Module):
    """The graph module's owner: the model's atoms and attributes under their own paths."""

    def __init__(self, model: nn.Module, attrs: dict[str, Any]) -> None:
        super().__init__()
        for path, obj in attrs.items():
            _place(self, path, obj)


def _place(root: nn.Module, path: str, obj: Any) -> None:
    *owners, name = path.split(".")
    mod = root
    for o in owners:
        if not hasattr(mod, o):
            mod.add_module(o, nn.Module())
        mod = getattr(mod, o)
    if isinstance(obj, nn.Module):
        mod.add_module(name, obj)
    elif isinstance(obj, nn.Parameter):
        mod.register_parameter(name, obj)
    elif isinstance(obj, torch.Tensor):
        mod.register_buffer(name, obj)
    else:
        setattr(mod, name, obj)
