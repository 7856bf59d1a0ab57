"""`Rule`: one kind of operation discovery knows, with an example it is tested on.

A rule declares the operations it handles (module types as `torch.fx` calls them, functions,
method names), the handler that maps its inputs' labels to its output's labels (see
`_labels.py`) and records parameter terms, and one or more example models whose symmetry
dimension was counted by hand. Pattern rules match a shape of the graph rather than one
operation (attention, residual-stream rotations, ...): they declare no operations and no
handler; their code runs where their `where` says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import fx, nn

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["Example", "Handler", "Rule"]

#: `handler(prop, node, out) -> labels of out` (a `(scale, perm)` pair, or `None`)
Handler = Callable[["Propagator", fx.Node, Any], Any]


@dataclass(frozen=True)
class Example:
    """A small model a rule applies to, with its symmetry dimension counted by hand.

    - `build()`: `(model, example inputs)`, float64, eval mode, inputs that reach every
      parameter (so the Jacobian's `n_params − rank J` is the true redundancy).
    - `dim`: the dimension discovery finds (the continuous part of the group).
    - `why`: the count in one line.
    - `jacobian_dim`: `n_params − rank J` when it is larger than `dim` (a redundancy the
      rule does not find; `why` names it); `None` when the two are equal.
    - `jacobian`: whether `n_params − rank J` is measured at all (`False` where the
      Jacobian has no clear gap in its singular values; `why` says so).
    """

    build: Callable[[], tuple[nn.Module, Any]]
    dim: int
    why: str
    jacobian_dim: int | None = None
    jacobian: bool = True


@dataclass(frozen=True)
class Rule:
    """How discovery treats one kind of operation (or, for a pattern rule, one pattern).

    - `name`, `family`: the rule and the `rules/` file it lives in.
    - `modules`, `functions`, `methods`: the `call_module` types (subclasses included),
      `call_function` targets and `call_method` names it handles.
    - `handler`: `handler(prop, node, out)` (see `Handler`); `None` for a pattern rule.
    - `examples`: small models with their hand-counted dimensions (see `Example`).
    - `where`: for a pattern rule, what it matches and where its code runs.
    - `several_outputs`: its modules return tuples (the handler labels each part or
      refuses); others returning tuples are refused before the handler is called.
    - `label_free`: its non-tensor results (shapes, metadata) say nothing about values.
    - `atomic`: its modules are captured whole (never traced into).
    """

    name: str
    family: str
    handler: Handler | None
    examples: tuple[Example, ...]
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    where: str = ""
    several_outputs: bool = False
    label_free: bool = False
    atomic: bool = True

    @property
    def pattern(self) -> bool:
        """Whether this rule matches a graph pattern instead of operations."""
        return self.handler is None

    def ops(self) -> tuple[Any, ...]:
        """Every operation it declares: module types, functions and method names."""
        return (*self.modules, *self.functions, *self.methods)
