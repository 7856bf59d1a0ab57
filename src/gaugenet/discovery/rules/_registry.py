"""The registry of rules: every rule of every family, and lookup by operation.

Discovery dispatches each graph node through `REGISTRY.for_node`; `torch.fx` keeps the
module types of atomic rules whole (`_trace.py`). An operation belongs to at most one rule
(checked here, when the registry is built).
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from ..._errors import GaugeError
from . import (
    activations,
    arithmetic,
    attention,
    linear,
    norms,
    offset_gains,
    patterns,
    pooling,
    recurrent,
    soft_capping,
    views,
)
from ._rule import Rule

__all__ = ["REGISTRY", "RULES", "Registry"]

#: every rule, family by family (one file each in `rules/`)
RULES: tuple[Rule, ...] = (
    *linear.RULES,
    *norms.RULES,
    *activations.RULES,
    *pooling.RULES,
    *views.RULES,
    *arithmetic.RULES,
    *attention.RULES,
    *recurrent.RULES,
    *patterns.RULES,
    *offset_gains.RULES,
    *soft_capping.RULES,
)


class Registry:
    """Rules by the operations they declare: module types (matched along the module's class
    hierarchy, so subclasses are included), functions and method names."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self._modules: dict[type, Rule] = {}
        self._functions: dict[Any, Rule] = {}
        self._methods: dict[str, Rule] = {}
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise GaugeError(f"rule names must be unique: {names}")
        for r in rules:
            if r.pattern and r.ops():
                raise GaugeError(f"pattern rule {r.name!r} declares operations")
            for table, ops in (
                (self._modules, r.modules),
                (self._functions, r.functions),
                (self._methods, r.methods),
            ):
                for op in ops:
                    if op in table:
                        raise GaugeError(
                            f"{op!r} is declared by the rules {table[op].name!r} and {r.name!r}"
                        )
                    table[op] = r

    def for_module(self, m: nn.Module) -> Rule | None:
        return self.for_type(type(m))

    def for_type(self, cls: type) -> Rule | None:
        """The rule of a module type: the first of its classes (itself, then its bases) that
        a rule declares."""
        return next((self._modules[c] for c in cls.__mro__ if c in self._modules), None)

    def for_function(self, f: Any) -> Rule | None:
        try:
            return self._functions.get(f)
        except TypeError:  # an unhashable target
            return None

    def for_method(self, name: str) -> Rule | None:
        return self._methods.get(name)

    def for_node(self, n: fx.Node, root: nn.Module) -> Rule | None:
        """The rule of a `call_module`, `call_function` or `call_method` node, if any."""
        if n.op == "call_module":
            return self.for_module(root.get_submodule(str(n.target)))
        if n.op == "call_function":
            return self.for_function(n.target)
        if n.op == "call_method":
            return self.for_method(str(n.target))
        return None

    def atomic_modules(self) -> tuple[type[nn.Module], ...]:
        """Module types `torch.fx` must not trace into: those of atomic rules."""
        return tuple(m for r in self.rules if r.atomic for m in r.modules)


REGISTRY = Registry(RULES)
