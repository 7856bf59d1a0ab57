"""Gains stored with an offset: `x · (w + c)` with `w` a parameter and `c` a constant number
(Gemma's RMSNorm, `x̂ · (1 + w)`).

The effective gain `g = w + c` rescales like a gain read directly; its stored entries move by
`w ↦ α (w + c) − c` (`groups/_offset_scale.py`). Found in the graph as a sum of a constant
number and a parameter (through casts), which only one product reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from ._linear import param_name
from ._ops import ADDITIONS, CASTS, graph_users

__all__ = ["OffsetGain", "offset_gain"]


@dataclass(frozen=True)
class OffsetGain:
    """`param + offset` read as a gain: the parameter's name and the constant."""

    param: str
    offset: float


def offset_gain(n: Any, root: nn.Module) -> OffsetGain | None:
    """`n` is `c + w` (either order, `w` a 1-D parameter seen through casts, `c` a finite
    nonzero number), and nothing else reads the sum, `w` or the casts between them
    (metadata checks aside): the parameter and `c`; else `None`."""
    if not (
        isinstance(n, fx.Node)
        and n.op == "call_function"
        and n.target in ADDITIONS
        and len(n.args) == 2
        and not n.kwargs
        and len(graph_users(n)) == 1
    ):
        return None
    a, b = n.args
    if _number(a):
        a, b = b, a
    if not _number(b) or not isinstance(a, fx.Node):
        return None
    while a.op == "call_function" and a.target in CASTS and len(graph_users(a)) == 1:
        a = a.args[0]
        if not isinstance(a, fx.Node):
            return None
    name = param_name(a, root)
    if name is None or len(graph_users(a)) != 1 or root.get_parameter(name).ndim != 1:
        return None
    return OffsetGain(name, float(b))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x != 0
