"""Propagating scale and channel labels through a traced graph.

The interpreter runs the graph on example inputs, so every shape is concrete, and beside
each value computes its two label maps (see `_labels.py`). Each node is dispatched to the
rule that declares its operation (`rules/`, looked up in `rules.REGISTRY`): the rule says
how that operation maps input labels to output labels and which parameters transform how.
An operation no rule declares, or that its rule cannot follow, fixes every label reaching it.

A node's maps are kept while a node still to run reads them; after their last reader only
the ids they carry are kept (`Propagator.carried`: what the passes after
propagation fix), so that the maps of a large model (one per node, of the node's shape)
are not all held at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from ._labels import ZERO, Labels
from ._norm_rules import NormRules
from ._ops import is_cast
from ._unread import Unread
from .rules import REGISTRY, Rule
from .rules._common import Pair, Unsupported, fixed, is_float

__all__ = ["Propagator"]


class Propagator(NormRules, fx.Interpreter):
    """Runs `gm` on example inputs and fills `self.labels` (a `Labels`)."""

    def __init__(self, gm: fx.GraphModule, root: nn.Module) -> None:
        super().__init__(gm)
        self.root = root
        self.L = Labels()
        #: the label maps of the nodes that a node still to run reads
        self.env_labels: dict[fx.Node, Any] = {}
        #: `(scale ids, perm ids)`, 1-D, of each node whose maps were read for the last time
        #: and that carried one pair of maps (see `carried`)
        self._carried: dict[fx.Node, Pair] = {}
        self.param_ids = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
        self.centered_layers: set[str] = set()
        self.centered_calls: dict[str, set[fx.Node]] = {}
        self.removed_memo: dict[fx.Node, bool] = {}
        #: lookups of tied tables whose values only LayerNorms read (`tied_table_factors`):
        #: each lookup's scale, and the tables summed with it with their scales
        self.tied_lookups: dict[fx.Node, tuple[float, list[tuple[str, float]]]] = {}
        #: every node's value on the example inputs (the attention pass probes paths with them)
        self.values: dict[fx.Node, Any] = {}
        #: the node being dispatched (its rules' parameter uses are recorded under it)
        self._current: str | None = None
        #: the parameter entries the graph never reads (set before running, see `_unread.py`)
        self.unread = Unread((), {})

    # -- plumbing -------------------------------------------------------------------------
    def lab(self, a: Any) -> Pair | None:
        if isinstance(a, fx.Node):
            return self.env_labels.get(a)
        return None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        self._current = n.name
        if n.op == "call_module":
            # every call of a module is a use of its parameters: a module called twice shares
            # them between two operations (a tie, see `_tied.py`)
            prefix = f"{n.target}."
            for pname, _ in self.submodule(n).named_parameters():
                self.use_param(prefix + pname, n.name)
        start = len(self.L.scale_terms)
        try:
            self.env_labels[n] = self.rule(n, out)
        except Unsupported as exc:
            self.env_labels[n] = self.break_all(n, out, str(exc))
        finally:
            self._current = None
        for k in range(start, len(self.L.scale_terms)):
            self.L.term_node[k] = n.name
        for a in self.user_to_last_uses.get(n, ()):
            # read for the last time: what later passes need is the ids the maps carry
            lab = self.env_labels.pop(a, None)
            if isinstance(lab, tuple) and len(lab) == 2 and isinstance(lab[0], Tensor):
                self._carried[a] = (_ids_in(lab[0]), _ids_in(lab[1]))
        return out

    def carried(self, n: fx.Node) -> Pair | None:
        """`(scale ids, perm ids)`, 1-D, holding every id of `n`'s labels (each at least
        once) when `n` carries one pair of label maps (`None` for no labels or labels of
        several tensors): the ids the passes after propagation fix (`Labels.fix_scales` and
        `fix_perms` read only the distinct ids)."""
        lab = self.env_labels.get(n)
        if isinstance(lab, tuple) and len(lab) == 2 and isinstance(lab[0], Tensor):
            return _ids_in(lab[0]), _ids_in(lab[1])
        return self._carried.get(n)

    def _labeled_input(self, n: fx.Node) -> bool:
        return any(_pairs(self.env_labels.get(a)) for a in n.all_input_nodes)

    def break_all(self, n: fx.Node, out: Any, reason: str) -> Pair | None:
        for a in n.all_input_nodes:
            for s, p in _pairs(self.env_labels.get(a)):
                self.L.fix_scales(s, n.name, reason)
                self.L.fix_perms(p, n.name, reason)
        return fixed(out) if is_float(out) else None

    def use_param(self, name: str, node: str) -> None:
        """Record that the graph node being dispatched reads parameter `name` (`node`, the
        rule's name for it, is kept only outside a dispatch): two uses are two graph nodes,
        even when both calls of one module carry its name."""
        p = self.root.get_parameter(name)
        node = self._current or node
        uses = self.L.param_users.setdefault(id(p), [])
        if (name, node) not in uses:
            uses.append((name, node))

    def submodule(self, n: fx.Node) -> nn.Module:
        """The module a `call_module` node calls."""
        return self.root.get_submodule(str(n.target))

    # -- dispatch -------------------------------------------------------------------------
    def rule(self, n: fx.Node, out: Any) -> Any:
        if n.op == "placeholder" or n.op == "get_attr":
            return fixed(out) if is_float(out) else None
        if n.op == "output":
            for lab in _flatten_labels(self.lab_tree(n.args[0])):
                self.L.fix_scales(lab[0], "output", "the output is fixed", quiet=True)
                self.L.fix_perms(
                    lab[1], "output", "the output is not allowed to change", quiet=True
                )
            return None
        found = REGISTRY.for_node(n, self.root)
        if found is not None and found.several_outputs:
            return found.handler(self, n, out)
        if not is_float(out):
            if isinstance(out, (tuple, list)) and n.op == "call_module":
                raise Unsupported(
                    f"module {type(self.submodule(n)).__name__} returns several tensors"
                )
            if n.op != "call_module" and not _label_free(n, found) and self._labeled_input(n):
                # a result the rules do not follow (a tuple of chunks, a comparison, ...):
                # whatever its inputs carry must be fixed, or it would pass unseen
                name = getattr(n.target, "__name__", n.target)
                raise Unsupported(f"{name}: its result is not one float tensor")
            return None
        if found is None:
            return self.unknown(n)
        return found.handler(self, n, out)

    def unknown(self, n: fx.Node) -> Any:
        """Refuse an operation no rule follows (a module or method after checking that its
        input carries labels, as the rules do)."""
        if n.op == "call_module":
            self.first(n)
            raise Unsupported(f"module {type(self.submodule(n)).__name__} is not analyzed")
        if n.op == "call_method":
            self.first(n)
            raise Unsupported(f"method .{n.target}() is not analyzed")
        raise Unsupported(f"operation {getattr(n.target, '__name__', n.target)} is not analyzed")

    def lab_tree(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env_labels.get(a)
        if isinstance(a, (tuple, list)):
            return [self.lab_tree(x) for x in a]
        if isinstance(a, dict):
            return [self.lab_tree(x) for x in a.values()]
        return None

    def first(self, n: fx.Node) -> tuple[fx.Node, Pair]:
        a = n.args[0]
        lab = self.lab(a)
        if lab is None:
            raise Unsupported(f"{n.target}: input carries no labels")
        return a, lab

    # -- helpers the rules share ------------------------------------------------------------
    def sole_producer(self, n: fx.Node, types: tuple[type, ...]) -> tuple[str, nn.Module] | None:
        """The layer of one of `types` whose output only `n` reads, if `n`'s input is one."""
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            return None
        m = self.root.get_submodule(str(src.target))
        return (str(src.target), m) if isinstance(m, types) else None

    def carrier(self, node: str, names: list[str], p: Tensor, axis: int) -> None:
        """Per-channel parameters that must be permuted along with their channels."""
        pcols = self.L.per_channel(p, axis)
        if any(len(c) > 1 for c in pcols):
            self.L.fix_perms(p, node, "channels mixed before a per-channel layer")
            return
        pids = torch.tensor([int(c[0]) if len(c) else ZERO for c in pcols])
        for q in names:
            self.L.perm_terms.append((q, 0, pids))

    def param_name(self, a: Any) -> str | None:
        """The parameter's name when `a` is a `get_attr` node reading one, directly or through
        casts and copies (`w.to(torch.float32)` is still the gain `w`)."""
        cast = False
        while isinstance(a, fx.Node) and a.args and is_cast(a):
            a, cast = a.args[0], True
        if isinstance(a, fx.Node) and a.op == "get_attr":
            if a in self.env:
                return self.param_ids.get(id(self.env[a]))
            if cast:  # the cast's input was freed once read: the attribute itself
                try:
                    return self.param_ids.get(id(self.root.get_parameter(str(a.target))))
                except AttributeError:
                    return None
        return None

    def env_or(self, a: Any) -> Any:
        return self.values.get(a) if isinstance(a, fx.Node) else a


def _ids_in(labels: Tensor) -> Tensor:
    """`(k,)`: every id of a label map, each at least once, and a copy (not a view holding
    the map). Axes along which the map is constant are dropped first (labels per channel
    repeat over tokens, per head over queries: no sort); what varies along more than one
    axis is reduced to its distinct ids."""
    t = labels
    for axis in range(t.ndim):
        if t.shape[axis] > 1:
            first = t.narrow(axis, 0, 1)
            if bool((t == first).all()):
                t = first
    if t.numel() > max(t.shape, default=1):
        return torch.unique(t)
    return t.reshape(-1).clone()


def _label_free(n: fx.Node, found: Rule | None) -> bool:
    """Operations whose non-tensor result says nothing about the values (shapes, metadata)."""
    if n.op in ("call_method", "call_function"):
        return found is not None and found.label_free
    return True


def _pairs(lab: Any) -> list[Pair]:
    """The `(scale, perm)` label maps a node carries: one pair, or one per part of a result
    with several tensors (`(scales, perms)` as two lists, `None` for an unlabeled part)."""
    if not isinstance(lab, tuple) or len(lab) != 2:
        return []
    s, p = lab
    if isinstance(s, Tensor):
        return [(s, p)]
    if isinstance(s, list) and isinstance(p, list):
        return [(a, b) for a, b in zip(s, p) if isinstance(a, Tensor)]
    return []


def _flatten_labels(tree: Any) -> list[Pair]:
    if tree is None or isinstance(tree, Tensor):
        return []
    pairs = _pairs(tree)
    if pairs:
        return pairs
    out = []
    for t in tree:
        out += _flatten_labels(t)
    return out
