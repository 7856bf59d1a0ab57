"""The hidden units of a mixture of experts whose weights are stored per expert, `(experts,
in, out)`, and multiplied batched (`bmm`) or grouped (`grouped_mm`, the tokens sorted by
expert).

A gated expert computes `y_e = (act(x W_e^gate) ⊙ x W_e^up) W_e^down`, its gate and up
columns one tensor `W_e^{gate|up}` split in two halves (`chunk(2, -1)`). Scaling the up
column `j` of expert `e` by `α_{e j} > 0` and row `j` of its down projection by `1/α_{e j}`
changes nothing: the product `act(g_j) u_j` is linear in `u_j`. The rescaling does not depend
on the routing (which tokens reach which expert), so it is read off the two products and the
gating between them in the graph:

    P₁ → [transpose] → op(x, ·) → chunk(2, -1) → act(gate) ⊙ up → [cast] → op(·, [transpose] P₂)

with `op` the same batched or grouped product (the same groups for `grouped_mm`), every
intermediate result read only on that path. The factor, `R^{E·I}`, is then checked on the
example inputs with every other factor (`_selfcheck.py`).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..groups import RescalingFactor, Scale
from ._ops import graph_users, is_cast

__all__ = ["expert_unit_factors"]

_BMM = {torch.bmm, torch.ops.aten.bmm.default}


def _product(n: fx.Node) -> str | None:
    """`"bmm"` or `"grouped"` for a batched or grouped matrix product, else `None`."""
    if n.op != "call_function":
        return None
    if n.target in _BMM:
        return "bmm"
    return "grouped" if "grouped_mm" in str(getattr(n.target, "__name__", n.target)) else None


def _weight(n: object, params: dict[str, nn.Parameter]) -> tuple[str, bool] | None:
    """The parameter behind `n` through casts and one transpose of its last two axes:
    `(name, transposed)`, or `None`."""
    transposed = False
    while isinstance(n, fx.Node):
        if n.op == "get_attr":
            name = str(n.target)
            return (name, transposed) if name in params and params[name].dim() == 3 else None
        if is_cast(n):
            n = n.args[0]
        elif _is_last_transpose(n) and not transposed:
            transposed, n = True, n.args[0]
        else:
            return None
    return None


def _is_last_transpose(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method") or "transpose" not in str(n.target):
        return False
    dims = {int(d) % 3 for d in n.args[1:3] if isinstance(d, int)}
    return dims == {1, 2}


def _only_user(n: fx.Node) -> fx.Node | None:
    users = graph_users(n)
    return users[0] if len(users) == 1 else None


def _through_casts(n: object) -> object:
    while isinstance(n, fx.Node) and is_cast(n):
        n = n.args[0]
    return n


def expert_unit_factors(gm: fx.GraphModule, model: nn.Module) -> list[RescalingFactor]:
    """One `RescalingFactor` per gated mixture of experts found in `gm` (module docstring)."""
    params = dict(model.named_parameters())
    out: list[RescalingFactor] = []
    for n2 in gm.graph.nodes:
        kind = _product(n2)
        if kind is None or len(n2.args) < 2:
            continue
        w2 = _weight(n2.args[1], params)
        found = _gating(_through_casts(n2.args[0]), kind, n2)
        if w2 is None or found is None:
            continue
        n1, up_half = found
        w1 = _weight(n1.args[1], params)
        if w1 is None or w1[0] == w2[0]:
            continue
        f = _factor(w1, w2, up_half, params)
        if f is not None and all(g.name != f.name for g in out):
            out.append(f)
    return out


def _gating(mul: object, kind: str, n2: fx.Node) -> tuple[fx.Node, int] | None:
    """`(n1, up half)` when `mul` is `act(gate) ⊙ up` of the two halves of one product `n1`
    of the same kind as `n2` (the same groups), each read only there."""
    if not (isinstance(mul, fx.Node) and mul.op == "call_function" and len(mul.args) == 2):
        return None
    if "mul" not in str(mul.target) or _only_user(mul) is None:
        return None
    halves = []
    for a in mul.args:
        if not isinstance(a, fx.Node):
            return None
        act = a if _is_half(a) is None else None
        half = a if act is None else (a.args[0] if len(a.args) == 1 else None)
        if not isinstance(half, fx.Node) or _is_half(half) is None or _only_user(half) is None:
            return None
        halves.append((half, act is not None))
    if sorted(g for _, g in halves) != [False, True]:
        return None
    (c1, k1), (c2, _) = (_is_half(h) for h, _ in halves)
    if c1 is not c2 or len(graph_users(c1)) != 2:
        return None
    up = next(_is_half(h)[1] for h, gated in halves if not gated)
    n1 = c1.args[0]
    if not isinstance(n1, fx.Node) or _product(n1) != kind or _only_user(n1) is not c1:
        return None
    if kind == "grouped" and (len(n1.args) < 3 or len(n2.args) < 3 or n1.args[2] is not n2.args[2]):
        return None
    return n1, up


def _is_half(n: fx.Node) -> tuple[fx.Node, int] | None:
    """`(chunk, k)` when `n` is half `k` of a `chunk(·, 2, -1)`."""
    if n.op != "call_function" or "getitem" not in str(n.target):
        return None
    c, k = n.args[0], n.args[1]
    if not (isinstance(c, fx.Node) and c.op == "call_function" and "chunk" in str(c.target)):
        return None
    pieces = c.args[1] if len(c.args) > 1 else c.kwargs.get("chunks")
    dim = c.args[2] if len(c.args) > 2 else c.kwargs.get("dim", 0)
    return (c, int(k)) if pieces == 2 and dim in (-1, 2) and k in (0, 1) else None


def _factor(
    w1: tuple[str, bool], w2: tuple[str, bool], up: int, params: dict[str, nn.Parameter]
) -> RescalingFactor | None:
    """The rescaling of the up columns of `w1` (its half `up` on the product's output axis)
    against the rows of `w2` on the product's input axis."""
    (p1, t1), (p2, t2) = w1, w2
    s1, s2 = params[p1].shape, params[p2].shape
    a1, a2 = (1 if t1 else 2), (2 if t2 else 1)  # output axis of P₁, input axis of P₂
    experts, units = int(s1[0]), int(s2[a2])
    if int(s2[0]) != experts or int(s1[a1]) != 2 * units or units == 0:
        return None
    n = experts * units
    ids = torch.arange(n).reshape(experts, units)
    cols = torch.full((experts, 2 * units), n, dtype=torch.long)
    cols[:, up * units : (up + 1) * units] = ids
    shape1, shape2 = [experts, 1, 1], [experts, 1, 1]
    shape1[a1], shape2[a2] = 2 * units, units
    terms = (Scale(p1, cols.reshape(shape1), 1), Scale(p2, ids.reshape(shape2), -1))
    module = p1.rpartition(".")[0]
    labels = tuple(f"{module}[expert {e}, unit {j}]" for e in range(experts) for j in range(units))
    return RescalingFactor(
        f"experts:{module}", n, terms=terms, modules=tuple(dict.fromkeys([module])), labels=labels
    )
