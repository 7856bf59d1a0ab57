"""Linear maps as the graph shows them: an `nn.Linear` call, or `addmm(bias, x, W)` /
`mm(x, W)` on parameters (GPT-2's `Conv1D`, weight `(in, out)`), which reads a flattened
`(tokens, in)` view of its input and whose output is viewed back to `(..., tokens, out)`.

The rules that care which parameters a layer's inputs and outputs run over (LayerNorm
kernels, outputs along `1`, attention projections) go through `Linear` and its `in_axis` /
`out_axis` instead of assuming `nn.Linear`'s layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ._ops import graph_users

__all__ = [
    "Linear",
    "as_linear",
    "keeps_last_axis",
    "linear_reading",
    "linear_writing",
    "param_name",
    "right_product",
]

aten = torch.ops.aten
_RESHAPES = {aten.reshape.default, aten.view.default, torch.reshape}
_MATMULS = (aten.addmm.default, aten.mm.default)


def right_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w` for a weight `w` stored `(in, out)`: a linear map on the last axis of `x` (the
    call `_param_linear.py` rewrites such products to)."""
    return torch.matmul(x, w)


_PARAM_LINEARS = (aten.linear.default, right_product)


@dataclass(frozen=True)
class Linear:
    """A linear map in the graph (`node` computes it).

    - `weight`, `bias`: parameter names (`bias` may be `None`).
    - `out_axis`: the weight axis over outputs (0 for `nn.Linear`'s `(out, in)`, 1 for an
      `addmm` weight `(in, out)`); `in_axis` is the other one."""

    node: fx.Node
    weight: str
    bias: str | None
    out_axis: int

    @property
    def name(self) -> str:
        return self.weight.rpartition(".")[0]

    @property
    def tag(self) -> str:
        """What the rules tag its output channels with: its module, or the weight's own
        name for a parameter of the model's root (`_labels.Labels.fresh`)."""
        return self.name or self.weight

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis

    def shape(self, root: nn.Module) -> tuple[int, int]:
        """`(out_features, in_features)`; a convolution's inputs are its flattened
        `(in_channels, kernel...)` entries."""
        w = root.get_parameter(self.weight)
        out = int(w.shape[self.out_axis])
        return out, w.numel() // out

    def input_node(self) -> Any:
        """The node whose value the map multiplies (`x` of `x Wᵀ` or `addmm(b, x, W)`)."""
        if self.node.op == "call_module":
            return self.node.args[0] if self.node.args else None
        if self.node.target in _PARAM_LINEARS:
            return self.node.args[0]
        return self.node.args[-2]


def param_name(n: Any, root: nn.Module) -> str | None:
    """The parameter a `get_attr` node names, or `None`."""
    if not (isinstance(n, fx.Node) and n.op == "get_attr"):
        return None
    try:
        p = root.get_parameter(str(n.target))
    except (AttributeError, TypeError):
        return None
    return str(n.target) if isinstance(p, nn.Parameter) else None


def as_linear(n: fx.Node, root: nn.Module) -> Linear | None:
    """The `Linear` that `n` computes, or `None`."""
    if n.op == "call_module":
        m = root.get_submodule(str(n.target))
        if not isinstance(m, nn.Linear):
            return None
        b = f"{n.target}.bias" if m.bias is not None else None
        return Linear(n, f"{n.target}.weight", b, 0)
    if n.op != "call_function" or n.kwargs:
        return None
    if n.target in _PARAM_LINEARS:
        # `aten.linear(x, W[, b])` (`W` `(out, in)`) or `right_product(x, W)` (`(in, out)`)
        # on parameters: the forms `_param_linear.py` rewrites
        w, bias = n.args[1], n.args[2] if len(n.args) > 2 else None
        out_axis = 0 if n.target is aten.linear.default else 1
    elif n.target in _MATMULS:
        bias, _, w = n.args if n.target is aten.addmm.default else (None, *n.args)
        out_axis = 1
    else:
        return None
    wname = param_name(w, root)
    bname = param_name(bias, root) if bias is not None else None
    if wname is None or (bias is not None and bname is None):
        return None
    if root.get_parameter(wname).ndim != 2:
        return None
    if bname is not None and root.get_parameter(bname).ndim != 1:
        return None
    return Linear(n, wname, bname, out_axis)


def _is_reshape(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in _RESHAPES


def _shape(n: Any, values: dict | None) -> tuple[int, ...] | None:
    """`n`'s shape: from its value when it has run, else (a reshape) from its arguments."""
    v = values.get(n) if values is not None else None
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if _is_reshape(n) and len(n.args) > 1 and isinstance(n.args[1], (list, tuple)):
        dims = n.args[1]
        return tuple(dims) if all(isinstance(d, int) for d in dims) else None
    return None


def linear_writing(s: Any, root: nn.Module, values: dict | None = None) -> Linear | None:
    """The `Linear` whose output `s` is: the map itself, or a reshape of an `addmm` output
    that only splits its token axis again (the last axis kept), read by nothing else."""
    if not isinstance(s, fx.Node):
        return None
    lin = as_linear(s, root)
    if lin is not None:
        return lin
    if not _is_reshape(s) or not isinstance(s.args[0], fx.Node):
        return None
    src = s.args[0]
    lin = as_linear(src, root)
    if lin is None or lin.out_axis != 1 or graph_users(src) != [s]:
        return None
    a, b = _shape(src, values), _shape(s, values)
    if a is not None and (b is None or b[-1] != a[-1]):
        return None
    return lin


def linear_reading(u: fx.Node, via: fx.Node, root: nn.Module, values: dict | None = None):
    """`(Linear, input node)` when the user `u` of `via` feeds `via` into a linear map as
    its input: directly, or through a reshape that only flattens the token axes (the last
    axis kept) into an `addmm`/`mm`, which nothing else reads. `None` otherwise."""
    lin = as_linear(u, root)
    if lin is not None:
        return (lin, u) if lin.input_node() is via and lin.node.args.count(via) == 1 else None
    if not _is_reshape(u) or u.args[0] is not via or len(graph_users(u)) != 1:
        return None
    (m,) = graph_users(u)
    lin = as_linear(m, root)
    if lin is None or lin.input_node() is not u:
        return None
    a, b = _shape(via, values), _shape(u, values)
    if a is not None and (b is None or len(b) != 2 or b[-1] != a[-1]):
        return None
    return lin, m


def keeps_last_axis(u: fx.Node, size: int, values: dict | None = None) -> bool:
    """`u` is a reshape of its first argument that keeps a last axis of `size` (the
    features): it only splits or merges token axes."""
    if not _is_reshape(u):
        return False
    shape = _shape(u, values)
    return shape is not None and len(shape) > 0 and shape[-1] == size
