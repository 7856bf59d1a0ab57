"""Keyword inputs for `certify`: the model seen as a function of positional tensors.

`symmetries` takes a dict of keyword inputs (`input_ids`, `attention_mask`, ...); the
Jacobian, the checks and the gap analysis take positional inputs. `positional` gives a
shallow copy of the model (the same parameters, under the same names, so the group acts on
it unchanged) whose `forward` takes the dict's values in order and returns the floating
tensors of the model's output as a tuple.
"""

from __future__ import annotations

import copy
import types
from typing import Any

from torch import Tensor, nn

__all__ = ["positional"]


def _floats(out: Any) -> tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    values = out.values() if hasattr(out, "values") else out
    return tuple(v for v in values if isinstance(v, Tensor) and v.is_floating_point())


def positional(model: nn.Module, inputs: Any) -> tuple[nn.Module, Any]:
    """`(model, inputs)` unchanged unless `inputs` is a dict; then a copy of `model` taking
    the dict's values positionally (in the dict's order) and the tuple of those values."""
    if not isinstance(inputs, dict):
        return model, inputs
    keys = list(inputs)
    base = type(model)

    def forward(self: nn.Module, *args: Any) -> tuple[Tensor, ...]:
        return _floats(base.forward(self, **dict(zip(keys, args))))

    # an instance attribute: the class, and so the group's model signature, stay the same
    wrapped = copy.copy(model)
    wrapped.forward = types.MethodType(forward, wrapped)
    return wrapped, tuple(inputs.values())
