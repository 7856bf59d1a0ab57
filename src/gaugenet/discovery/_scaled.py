"""A tensor times one constant number (Gemma's and Pegasus's `√d` on the token embeddings):
what commutes with scalars (a rotation, a shift along `1` before a LayerNorm) passes it; a
product with constant ones (DeBERTa's mask when none is given) passes anything; transposed
keys divided by a constant number (DeBERTa's `√(d_head · f)`) are keys to the attention."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor, fx, nn

from ._linear import param_name

__all__ = ["constant_factor", "scaled_by_constant", "times_one", "unscaled_keys"]

aten = torch.ops.aten

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


def times_one(u: fx.Node, n: fx.Node, root: nn.Module, values: dict) -> bool:
    """`u` is `n · c` (either order) with `c` a tensor of ones that keeps `n`'s shape and
    that no input value, parameter or module output computes (its shape and dtype may be
    read off the input): DeBERTa multiplies its embeddings by the attention mask, which is
    `ones` built in the graph when no mask is given. `u` equals `n`, so whatever reads `u`
    reads `n`. `c` is evaluated from its own nodes (it may come after `n`, not run yet)."""
    if not (u.op == "call_function" and u.target in _MUL and len(u.args) == 2 and not u.kwargs):
        return False
    if u.args.count(n) != 1:
        return False
    c = u.args[1] if u.args[0] is n else u.args[0]
    x = values.get(n)
    if not (isinstance(c, fx.Node) and isinstance(x, torch.Tensor)):
        return False
    env = _evaluate(c, root, values)
    v = env.get(c) if env is not None else None
    if not isinstance(v, torch.Tensor) or v.ndim > x.ndim or not _value_free(c, env, root):
        return False
    if v.is_meta:  # shapes only (a model on the meta device): `c` reads no value, so the
        # computed values it starts from may as well be zeros of their shapes
        env = _evaluate(c, root, _materialized(c, values))
        v = env.get(c) if env is not None else None
        if not isinstance(v, torch.Tensor) or v.is_meta:
            return False
    try:
        same = torch.broadcast_shapes(x.shape, v.shape) == x.shape
    except RuntimeError:
        return False
    return same and bool((v == 1).all())


def _materialized(c: fx.Node, values: dict) -> dict:
    """`values` with the meta tensors among the computed values `c` starts from replaced
    by zeros of their shapes and dtypes on the CPU."""
    out, todo, seen = dict(values), [c], set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        v = values.get(x)
        if isinstance(v, torch.Tensor) and v.is_meta:
            out[x] = torch.zeros(v.shape, dtype=v.dtype)
        elif x not in values:
            todo += list(x.all_input_nodes)
    return out


def _evaluate(c: fx.Node, root: nn.Module, values: dict) -> dict[fx.Node, Any] | None:
    """The values of `c` and its ancestors: those already computed (`values`) as they are,
    the others run in graph order (`None` if one of them is a module call or an input)."""
    todo, seen = [c], set()
    while todo:
        x = todo.pop()
        if x not in seen:
            seen.add(x)
            if x not in values:
                todo += list(x.all_input_nodes)
    env: dict[fx.Node, Any] = {}
    for x in (m for m in c.graph.nodes if m in seen):
        if x in values:
            env[x] = values[x]
            continue
        if x.op not in ("get_attr", "call_function", "call_method") or _in_place(x):
            return None  # (an in-place operation would change a value already computed)
        args = fx.node.map_arg(x.args, env.__getitem__)
        kwargs = fx.node.map_arg(x.kwargs, env.__getitem__)
        try:
            if x.op == "get_attr":
                obj: Any = root
                for part in str(x.target).split("."):
                    obj = getattr(obj, part)
                env[x] = obj
            elif x.op == "call_function":
                env[x] = x.target(*args, **kwargs)
            else:
                env[x] = getattr(args[0], str(x.target))(*args[1:], **kwargs)
        except Exception:  # whatever it raises, `c` is then not known to be ones
            return None
    return env


def _in_place(x: fx.Node) -> bool:
    """`x` writes into one of its inputs (`add_`, `aten.mul_.Tensor`, ...)."""
    name = x.target if isinstance(x.target, str) else getattr(x.target, "__name__", "")
    name = str(name).split(".")[0]
    return name.endswith("_") and not name.startswith("_")


def _value_free(c: fx.Node, env: dict[fx.Node, Any], root: nn.Module) -> bool:
    """No input, parameter or module output reaches `c` through tensors (a shape or dtype
    read off the input passes as a number or a `dtype`, not as its values)."""
    todo, seen = [c], set()
    while todo:
        x = todo.pop()
        if x in seen or not isinstance(env.get(x), torch.Tensor):
            continue
        seen.add(x)
        if x.op in ("placeholder", "call_module") or param_name(x, root) is not None:
            return False
        todo += list(x.all_input_nodes)
    return True


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


_SCALINGS = {
    aten.div.Tensor,
    aten.div.Scalar,
    aten.mul.Tensor,
    aten.mul.Scalar,
    torch.div,
    torch.mul,
    operator.truediv,
    operator.mul,
}


def unscaled_keys(kt: Any, values: dict, root: nn.Module) -> Any:
    """`Kᵀ` from `Kᵀ / c` or `c · Kᵀ` with `c` one constant number (DeBERTa divides the
    transposed keys by `√(d_head · f)` before the product): the number scales every score
    alike, as a scaling of the scores would. Anything else is returned as it is."""
    while isinstance(kt, fx.Node) and kt.op == "call_function" and kt.target in _SCALINGS:
        if kt.kwargs or len(kt.args) != 2:
            return kt
        a, b = kt.args
        divides = kt.target in (aten.div.Tensor, aten.div.Scalar, torch.div, operator.truediv)
        side = [(a, b)] if divides else [(a, b), (b, a)]
        inner = next(
            (x for x, c in side if isinstance(x, fx.Node) and _one_number(c, values, root)), None
        )
        if inner is None:
            return kt
        kt = inner
    return kt


def _one_number(c: Any, values: dict, root: nn.Module) -> bool:
    """`c` is a nonzero number: a Python number (also one computed from shapes, as
    `math.sqrt(q.size(-1))`), or a one-entry tensor that no input, parameter or module
    output computes (a number read off a shape may be on the way)."""
    v = values.get(c) if isinstance(c, fx.Node) else c
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if not isinstance(v, Tensor) or v.numel() != 1 or not bool(v.ne(0).all()):
        return False
    return _value_free(c, values, root)
