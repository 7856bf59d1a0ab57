"""A tensor times one constant number (Gemma's and Pegasus's `√d` on the token embeddings):
what commutes with scalars (a rotation, a shift along `1` before a LayerNorm) passes it."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

from ._linear import param_name

__all__ = ["constant_factor", "scaled_by_constant"]

_MUL = {torch.mul, operator.mul, torch.ops.aten.mul.Tensor}


def scaled_by_constant(u: fx.Node, n: fx.Node, root: nn.Module, values: dict) -> bool:
    """`u` is `n · c` (either order) with `c` one constant number: a finite number, or a
    one-entry tensor computed from no input and no parameter (Gemma's `√d` buffer, cast).
    A rotation commutes with it."""
    if not (u.op == "call_function" and u.target in _MUL and len(u.args) == 2 and not u.kwargs):
        return False
    if u.args[0] is n and u.args[1] is n:
        return False
    c = u.args[1] if u.args[0] is n else u.args[0]
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return math.isfinite(c)
    v = values.get(c) if isinstance(c, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.numel() == 1 and _constant(c, root)


def _constant(c: Any, root: nn.Module) -> bool:
    """`c` depends on no input and no parameter (buffers, numbers, casts of them)."""
    todo, seen = [c], set()
    while todo:
        x = todo.pop()
        if not isinstance(x, fx.Node) or x in seen:
            continue
        seen.add(x)
        if x.op == "placeholder" or param_name(x, root) is not None or x.op == "call_module":
            return False
        todo += list(x.all_input_nodes)
    return True


def constant_factor(u: fx.Node, n: fx.Node, values: dict) -> float:
    """The number `c` of `u = n · c`, where `scaled_by_constant(u, n, ...)` holds."""
    c = u.args[1] if u.args[0] is n else u.args[0]
    return float(c) if isinstance(c, (int, float)) else float(values[c].reshape(()))
