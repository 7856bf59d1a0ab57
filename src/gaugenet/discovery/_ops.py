"""How each operation treats scales and channels: the classification tables of discovery
(the rules in `rules/` declare these operations; the graph passes read them too)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = [
    "ADDITIONS",
    "CASTS",
    "CAST_METHODS",
    "DTYPE_CASTS",
    "HOMOGENEOUS_FUNCS",
    "HOMOGENEOUS_MODULES",
    "METADATA_OPS",
    "NONHOMOGENEOUS",
    "POOL_FUNCS",
    "POOL_MODULES",
    "TOKEN_PICKS",
    "VIEW_FUNCS",
    "VIEW_METHODS",
    "graph_users",
    "is_cast",
    "is_token_pick",
    "nonhomogeneous_reason",
    "passes_input",
    "picks_tokens",
]

aten = torch.ops.aten

#: Casts and copies (aten, as `torch.export` writes them): the values, and so every label
#: and every symmetry, pass through unchanged.
CASTS = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
}
#: Casts to another tensor's dtype (`x.type_as(other)`): the first argument's values pass
#: through; the second is read for its dtype only.
DTYPE_CASTS = {aten.type_as.default}
#: The same casts and copies as `torch.fx` records them, tensor methods (`call_method`).
CAST_METHODS = ("to", "float", "double", "half", "bfloat16", "clone", "cpu")
#: Checks of a tensor's dtype and shape that `torch.export` inserts: they compute nothing.
METADATA_OPS = {aten._assert_tensor_metadata.default}
#: the sum of two tensors (without the in-place `iadd`)
ADDITIONS = {torch.add, operator.add, aten.add.Tensor}

#: Elementwise and positively homogeneous of degree 1: `f(α x) = α f(x)` for `α > 0`.
HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
)
HOMOGENEOUS_FUNCS = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.dropout,
    F.prelu,
    torch.nn.functional.relu_,
    F.dropout1d,
    F.dropout2d,
}

POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
POOL_FUNCS = {
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.lp_pool1d,
    F.lp_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    torch.max_pool1d,
    torch.max_pool2d,
    torch.avg_pool1d,
}


def slice_along(
    x: Tensor, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1
) -> Tensor:
    """`aten.slice.Tensor` as a function of the same arguments: `x[start:end:step]` along
    `dim` (how `torch.export` writes `x[..., :k]`)."""
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


def expand_to(x: Tensor, size: list[int], *, implicit: bool = False) -> Tensor:
    """`aten.expand.default` as a function: `x.expand(size)` (the repeated entries are the
    same values, so they carry the same labels)."""
    return x.expand(size)


#: picking tokens (not features): a reader of the picked rows still reads the whole
#: feature vectors of the tensor picked from (export's slices are renamed `slice_along`)
TOKEN_PICKS = {aten.select.int, slice_along}


def is_token_pick(u: fx.Node) -> bool:
    """`u` selects or slices a tensor along some axis (`TOKEN_PICKS`, with its axis given)."""
    return u.op == "call_function" and u.target in TOKEN_PICKS and len(u.args) > 1


def picks_tokens(u: fx.Node, ndim: int) -> bool:
    """The pick `u` (`is_token_pick`) of an `ndim`-axis tensor is along an axis other than
    the last (the features): tokens, not features."""
    dim = u.args[1]
    return isinstance(dim, int) and ndim > 1 and dim % ndim != ndim - 1


VIEW_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "t",
    "unflatten",
    "view_as",
    "reshape_as",
    "movedim",
    "expand",
    "expand_as",
}
VIEW_FUNCS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.t,
    torch.movedim,
    torch.unflatten,
    slice_along,
    expand_to,
}

_REASONS = {
    nn.Tanh: "Tanh is not positively homogeneous",
    nn.GELU: "GELU is not positively homogeneous",
    nn.Sigmoid: "Sigmoid is not positively homogeneous",
    nn.ReLU6: "ReLU6 clips at 6, so it is not positively homogeneous",
    nn.Hardtanh: "Hardtanh clips, so it is not positively homogeneous",
    nn.SiLU: "SiLU is not positively homogeneous",
    nn.ELU: "ELU is not positively homogeneous",
    nn.SELU: "SELU is not positively homogeneous",
    nn.CELU: "CELU is not positively homogeneous",
    nn.Softplus: "Softplus is not positively homogeneous",
    nn.Mish: "Mish is not positively homogeneous",
    nn.Hardswish: "Hardswish is not positively homogeneous",
    nn.Hardsigmoid: "Hardsigmoid is not positively homogeneous",
    nn.Softsign: "Softsign is not positively homogeneous",
    nn.Tanhshrink: "Tanhshrink is not positively homogeneous",
    nn.Softmax: "softmax is not positively homogeneous",
    nn.LogSoftmax: "log-softmax is not positively homogeneous",
    torch.tanh: "tanh is not positively homogeneous",
    F.tanh: "tanh is not positively homogeneous",
    torch.sigmoid: "sigmoid is not positively homogeneous",
    F.sigmoid: "sigmoid is not positively homogeneous",
    F.gelu: "GELU is not positively homogeneous",
    F.silu: "SiLU is not positively homogeneous",
    F.relu6: "ReLU6 clips at 6, so it is not positively homogeneous",
    F.hardtanh: "Hardtanh clips, so it is not positively homogeneous",
    F.elu: "ELU is not positively homogeneous",
    F.softplus: "Softplus is not positively homogeneous",
    F.softmax: "softmax is not positively homogeneous",
    torch.softmax: "softmax is not positively homogeneous",
    F.log_softmax: "log-softmax is not positively homogeneous",
    torch.exp: "exp is not positively homogeneous",
    torch.erf: "erf is not positively homogeneous",
    F.mish: "Mish is not positively homogeneous",
    F.hardswish: "Hardswish is not positively homogeneous",
    torch.abs: "abs is homogeneous but not a pass-through for permutations of sign",
}
#: Elementwise functions that keep channel structure but break positive rescaling.
NONHOMOGENEOUS = tuple(k for k in _REASONS if isinstance(k, type))
NONHOMOGENEOUS_FUNCS = {k for k in _REASONS if not isinstance(k, type)}

ADD_OPS = {operator.add, torch.add, operator.iadd, operator.sub, torch.sub, operator.isub}
MUL_OPS = {operator.mul, torch.mul, operator.imul, operator.truediv, torch.div, operator.itruediv}
NONHOMOGENEOUS_METHODS = {
    "tanh": "tanh is not positively homogeneous",
    "sigmoid": "sigmoid is not positively homogeneous",
    "softmax": "softmax is not positively homogeneous",
    "exp": "exp is not positively homogeneous",
}


def nonhomogeneous_reason(op) -> str | None:
    if isinstance(op, type):
        return next(
            (r for k, r in _REASONS.items() if isinstance(k, type) and issubclass(op, k)), None
        )
    return _REASONS.get(op)


def is_cast(n: fx.Node) -> bool:
    """A cast or copy (`CASTS`, or one of `CAST_METHODS` as `torch.fx` records them): the
    values of its first argument, in another dtype or storage."""
    if n.op == "call_function":
        return n.target in CASTS
    return n.op == "call_method" and n.target in CAST_METHODS


def graph_users(n: fx.Node) -> list[fx.Node]:
    """`n`'s users, without the metadata checks `torch.export` inserts (they compute
    nothing)."""
    return [u for u in n.users if not (u.op == "call_function" and u.target in METADATA_OPS)]


def passes_input(n: object, root: nn.Module) -> bool:
    """`n` calls a module that passes its input on unchanged: `nn.Identity`, or dropout in
    eval mode (or with `p = 0`)."""
    if not isinstance(n, fx.Node) or n.op != "call_module":
        return False
    m = root.get_submodule(str(n.target))
    if isinstance(m, nn.Identity):
        return True
    return isinstance(m, nn.modules.dropout._DropoutNd) and (not m.training or m.p == 0)
