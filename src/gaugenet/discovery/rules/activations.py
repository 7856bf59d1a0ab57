"""Elementwise activations: positively homogeneous ones pass scales and channels on; the
others keep channels but fix their input's scales (the reasons are in `_ops.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from .._ops import (
    HOMOGENEOUS_FUNCS,
    HOMOGENEOUS_MODULES,
    NONHOMOGENEOUS,
    NONHOMOGENEOUS_FUNCS,
    NONHOMOGENEOUS_METHODS,
    nonhomogeneous_reason,
)
from ._common import Pair
from ._examples import batch, seeded
from ._rule import Example, Rule

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["RULES"]


def homogeneous(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`f(α x) = α f(x)` for `α > 0`, elementwise: labels pass through. A PReLU with one
    slope per channel carries its slopes along with the channels."""
    _, (s, p) = prop.first(n)
    if n.op == "call_module":
        m = prop.submodule(n)
        if isinstance(m, nn.PReLU) and m.num_parameters > 1:
            prop.carrier(str(n.target), [f"{n.target}.weight"], p, axis=1)
    return s, p


_SOFTMAX_FUNCS = {
    torch.softmax,
    torch.nn.functional.softmax,
    torch.nn.functional.log_softmax,
    torch.log_softmax,
    torch.ops.aten._softmax.default,
    torch.ops.aten._log_softmax.default,
}


def _softmax_dim(prop: Propagator, n: fx.Node) -> Any:
    """The axis a softmax or log-softmax node normalizes over, or `None` for other nodes."""
    if n.op == "call_module":
        m = prop.submodule(n)
        return m.dim if isinstance(m, (nn.Softmax, nn.LogSoftmax)) else None
    if (n.op == "call_function" and n.target in _SOFTMAX_FUNCS) or (
        n.op == "call_method" and n.target in ("softmax", "log_softmax")
    ):
        return n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return None


def nonhomogeneous(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """Elementwise, not positively homogeneous: scales fixed, channels passed on. A softmax
    over a linear layer's outputs also removes what that layer adds along `1`."""
    _, (s, p) = prop.first(n)
    dim = _softmax_dim(prop, n)
    if dim is not None:
        prop.softmax_inputs(n, dim)
    if n.op == "call_module":
        prop.L.fix_scales(s, str(n.target), nonhomogeneous_reason(type(prop.submodule(n))))
    elif n.op == "call_method":
        prop.L.fix_scales(s, n.name, NONHOMOGENEOUS_METHODS[n.target])
    else:
        prop.L.fix_scales(s, n.name, nonhomogeneous_reason(n.target))
    return torch.zeros_like(s), p


def _mlp(act: nn.Module) -> tuple[nn.Module, Any]:
    return seeded(lambda: nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2))), batch(64, 3)


RULES = (
    Rule(
        "positively homogeneous",
        "activations",
        homogeneous,
        (
            Example(lambda: _mlp(nn.LeakyReLU(0.1)), 4, "one positive scale per hidden unit"),
            Example(lambda: _mlp(nn.PReLU(4)), 4, "one scale per hidden unit; slopes permute"),
        ),
        modules=HOMOGENEOUS_MODULES,
        functions=tuple(HOMOGENEOUS_FUNCS),
        methods=("relu", "relu_"),
    ),
    Rule(
        "not homogeneous",
        "activations",
        nonhomogeneous,
        (Example(lambda: _mlp(nn.Tanh()), 0, "tanh fixes the hidden scales (signs are discrete)"),),
        modules=NONHOMOGENEOUS,
        functions=tuple(NONHOMOGENEOUS_FUNCS),
        methods=tuple(NONHOMOGENEOUS_METHODS),
    ),
)
