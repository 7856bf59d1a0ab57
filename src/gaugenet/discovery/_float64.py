"""Running a float64 model in float64 throughout: casts to a lower precision are dropped.

Many models compute part of their work in float32 whatever their own dtype (a softmax with
`dtype=torch.float32`, an RMSNorm whose variance is taken after `.to(torch.float32)`).
In a float64 copy these casts leave float32 rounding in the outputs, which hides exact
identities behind noise of `1e-7`. Inside `keep_float64()`, a cast of a float64 tensor to a
lower floating precision (`.to(dtype)`, `.float()`, `.half()`, `.bfloat16()`, `.type(...)`,
or a `dtype=` keyword of any torch function given a float64 tensor) keeps float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["keep_float64"]

_LOW = (torch.float32, torch.float16, torch.bfloat16)
_DOWN = {Tensor.float, Tensor.half, Tensor.bfloat16}


def _is64(x: Any) -> bool:
    return isinstance(x, Tensor) and x.dtype == torch.float64


def _has64(args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if _is64(a) or (isinstance(a, (tuple, list)) and any(_is64(b) for b in a)):
            return True
    return False


class keep_float64(TorchFunctionMode):
    """Context manager: float64 tensors are not cast down (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _DOWN and args and _is64(args[0]):
            return args[0]
        if func in (Tensor.to, Tensor.type) and args and _is64(args[0]):
            args = tuple(torch.float64 if a in _LOW else a for a in args)
            if kwargs.get("dtype") in _LOW:
                kwargs["dtype"] = torch.float64
        elif kwargs.get("dtype") in _LOW and _has64(args, kwargs):
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)
