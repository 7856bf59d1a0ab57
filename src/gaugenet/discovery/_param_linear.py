"""Linear maps written with a parameter matrix inside `forward`, as papers write networks:
`x @ W.T`, `torch.matmul(x, W.t())`, `torch.mm(x, W.T)`, `torch.addmm(b, x, W.T)` and
`F.linear(x, W, b)` on parameters of any name, in the module that holds them.

Each is the one `aten.linear(x, W[, b])` call it computes (`W` of shape `(out, in)`, as in
`nn.Linear`): this pass rewrites the graph's node to that call, on the parameters' own
`get_attr` nodes, and the rule for parameter linear maps (`rules/linear.py`) reads it as a
linear layer. Only what is exactly that map is rewritten: a 2-D parameter, transposed
(`.T`, `.mT`, `.t()`, `transpose` of its two axes, `permute(1, 0)`, their aten ops), as the
right operand of a product, nothing else passed (`addmm` with `beta` or `alpha` is left
alone). A weight stored `(in, out)` and used as it is, `x @ W` or `torch.matmul(x, W)` on
an input of any rank, becomes `right_product(x, W)`, read the same way with its outputs on
axis 1 (a 2-D `mm`/`addmm` on parameters already is, GPT-2's `Conv1D`). `einsum` of an
input and a matrix parameter that contracts the input's last axis (`"bi,oi->bo"`,
`"...i,io->...o"`) is the one or the other. A bias written as `x @ W.T + b` stays a
parameter added to the product, which the rule for additions reads. `F.linear` calls that
a module of their own stands for are `nn.Linear`s already (`_functional_layers.py`); this
pass sees the ones left.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
from torch import fx, nn

from ._linear import param_name, right_product

__all__ = ["LINEAR", "param_linears"]

aten = torch.ops.aten
LINEAR = aten.linear.default
_PRODUCTS = (operator.matmul, torch.matmul, aten.matmul.default, torch.mm, aten.mm.default)
_ADDMM = (torch.addmm, aten.addmm.default)
_LINEARS = (torch._C._nn.linear, LINEAR)
_T_FUNCTIONS = (aten.t.default, aten.numpy_T.default, torch.t)
_T_METHODS = ("t",)
_EINSUM = (torch.einsum, aten.einsum.default)


def _einsum_form(eq: Any) -> str | None:
    """`"oi"` when `einsum(eq, x, W)` is `x Wᵀ` on the last axis of `x` (`W` `(out, in)`),
    `"io"` when it is `x W` (`W` `(in, out)`), else `None`."""
    if not isinstance(eq, str) or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return None
    a, b = ops
    if len(b) != 2 or "." in b or not a or b[0] == b[1]:
        return None
    c = a[-1]
    if c not in b or c in a[:-1]:
        return None
    o = b[1] if b[0] == c else b[0]
    if o in a or out != a[:-1] + o:
        return None
    return "io" if b[0] == c else "oi"


def _param(n: Any, root: nn.Module, ndim: int) -> bool:
    """`n` reads a parameter of `root` with `ndim` axes."""
    name = param_name(n, root)
    return name is not None and root.get_parameter(name).ndim == ndim


def _swaps_two_axes(dims: tuple[Any, ...]) -> bool:
    """`transpose(d0, d1)` or `permute(d0, d1)` of a matrix that swaps its two axes."""
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    return {d % 2 for d in dims} == {0, 1}


def _transposed_weight(n: Any, root: nn.Module) -> fx.Node | None:
    """The matrix parameter's node when `n` computes its transpose, else `None`."""
    if not isinstance(n, fx.Node) or n.kwargs or not n.args:
        return None
    w = n.args[0]
    if not _param(w, root, 2):
        return None
    rest = n.args[1:]
    if n.op == "call_function":
        if n.target in _T_FUNCTIONS and not rest:
            return w
        if n.target is builtins.getattr and rest in (("T",), ("mT",)):
            return w
        if n.target in (aten.transpose.int, torch.transpose, aten.permute.default, torch.permute):
            return w if _swaps_two_axes(rest) else None
    if n.op == "call_method":
        if n.target in _T_METHODS and not rest:
            return w
        if n.target in ("transpose", "permute", "swapaxes", "swapdims"):
            return w if _swaps_two_axes(rest) else None
    return None


def _replace(graph: fx.Graph, n: fx.Node, args: tuple[Any, ...], target: Any = LINEAR) -> None:
    with graph.inserting_before(n):
        new = graph.call_function(target, args)
    new.meta.update(n.meta)
    n.replace_all_uses_with(new)
    graph.erase_node(n)


def param_linears(gm: fx.GraphModule, root: nn.Module) -> int:
    """Rewrite every parameter linear map of `gm` (see the module's text) as an
    `aten.linear` call on its parameters; returns how many were rewritten."""
    graph, count = gm.graph, 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.kwargs:
            continue
        args: tuple[Any, ...] | None = None
        target: Any = LINEAR
        if n.target in _PRODUCTS and len(n.args) == 2:
            w = _transposed_weight(n.args[1], root)
            args = (n.args[0], w) if w is not None else None
            plain = w is None and n.target not in (torch.mm, aten.mm.default)
            if plain and _param(n.args[1], root, 2) and not _param(n.args[0], root, 2):
                args, target = (n.args[0], n.args[1]), right_product
        elif n.target in _EINSUM and len(n.args) in (2, 3):
            eq, *operands = n.args
            if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = list(operands[0])
            form = _einsum_form(eq)
            if form and len(operands) == 2 and _param(operands[1], root, 2):
                args = (operands[0], operands[1])
                target = LINEAR if form == "oi" else right_product
        elif n.target in _ADDMM and len(n.args) == 3:
            w = _transposed_weight(n.args[2], root)
            if w is not None and _param(n.args[0], root, 1):
                args = (n.args[1], w, n.args[0])
        elif n.target in _LINEARS and n.target is not LINEAR and 2 <= len(n.args) <= 3:
            w, b = n.args[1], n.args[2] if len(n.args) == 3 else None
            if _param(w, root, 2) and (b is None or _param(b, root, 1)):
                args = tuple(n.args) if b is not None else (n.args[0], w)
        if args is None:
            continue
        transposes = [
            a
            for a in n.args[1:]
            if isinstance(a, fx.Node) and a.op != "get_attr" and a is not args[0]
        ]
        _replace(graph, n, args, target)
        for t in transposes:  # now unread, unless something else reads them too
            if not t.users:
                graph.erase_node(t)
        count += 1
    if count:
        gm.recompile()
    return count
