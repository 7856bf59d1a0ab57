"""The model as a function of a flat float64 parameter vector (shared by both certifiers)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["as_flat_function", "as_tuple"]


def as_tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _flatten_out(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out.reshape(-1)
    if isinstance(out, dict) or hasattr(out, "values"):
        out = [v for v in out.values() if isinstance(v, Tensor)]
    parts = [_flatten_out(o) for o in out if o is not None]
    return torch.cat(parts) if parts else torch.zeros(0)


def as_flat_function(
    model: nn.Module, inputs: Any
) -> tuple[Callable[[Tensor], Tensor], Tensor, list[str]]:
    """`(f, theta, names)`: `f(theta)` is every output on `inputs`, flattened, with the
    parameters set from the flat float64 vector `theta` (in `named_parameters()` order).
    Floating inputs and buffers are cast to float64 so the Jacobian's rank is meaningful."""
    model = copy.deepcopy(model).double()
    args = tuple(
        a.double() if isinstance(a, Tensor) and a.is_floating_point() else a
        for a in as_tuple(inputs)
    )
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(th: Tensor) -> Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, th.split(sizes), shapes)}
        # the fused attention kernel has no forward-mode derivative: use the composite path
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                out = torch.func.functional_call(model, {**params, **buffers}, args)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        return _flatten_out(out)

    return f, theta, names
