"""Discovery on the meta device: shapes only, no values.

A model built under `torch.device("meta")` has parameters with shapes and dtypes but no
values. Capture and propagation (`_propagate.py`) only need shapes, so `symmetries` runs
on such a model as on a real one: the example inputs are moved to the meta device, and
the graph is captured and propagated there. What cannot run is the numeric self-check
(`_selfcheck.py`): there are no outputs to compare. The group then says so: its
`unchecked` attribute holds the reason and its `repr` ends in `unchecked`.

`check_on(group, model, example_inputs)` checks such a group later, on a model of the same
signature that has weights (the whole model, or any part of it carrying the factors' own
layers, e.g. one decoder block loaded while streaming a checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .._errors import GaugeError
from ..groups import GaugeGroup
from ._inputs import Call, as_call
from ._selfcheck import self_check

__all__ = ["META_UNCHECKED", "check_on", "is_meta", "meta_call", "unchecked"]

#: why a group found on the meta device is not checked
META_UNCHECKED = (
    "found on the meta device (shapes only): the factors were not checked numerically; "
    "check them on weights with gaugenet.discovery.check_on(group, model, example_inputs)"
)


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of `model` is on the meta device (has no values)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def meta_call(call: Call) -> Call:
    """The call with every tensor moved to the meta device (shapes and dtypes kept)."""

    def move(x: Any) -> Any:
        return x.to("meta") if isinstance(x, Tensor) else x

    args, kwargs = call
    return tree_map(move, tuple(args)), tree_map(move, dict(kwargs))


def unchecked(group: GaugeGroup, reason: str = META_UNCHECKED) -> GaugeGroup:
    """`group` marked as not checked numerically, with the reason."""
    return dataclasses.replace(group, unchecked=reason)


def check_on(
    group: GaugeGroup, model: nn.Module, example_inputs: Any = None, *, seed: int = 0
) -> GaugeGroup:
    """`group` checked numerically on `model`, which has weights: the factors that change
    the outputs are dropped and named among the breakers (as `symmetries` does on a real
    model); the result is marked checked.

    **Arguments:**

    - `group`: a group found by `symmetries`, typically on the meta device.
    - `model`: the same model with weights (same signature: parameter names, shapes and
      modules), on a real device.
    - `example_inputs`: inputs for `model`; defaults to the group's own example inputs
      (which for a meta group are meta tensors and hence need replacing).

    **Returns:** the checked `GaugeGroup`.

    Raises `GaugeError` when `model` has no values or is not the group's model.
    """
    if is_meta(model):
        raise GaugeError(
            f"{type(model).__name__} is on the meta device: it has no weights to check the "
            "factors on; load them first (e.g. model.to_empty(device='cpu') and load_state_dict)"
        )
    group.check_model(model)
    inputs = group.example_inputs if example_inputs is None else example_inputs
    if inputs is None:
        raise GaugeError("pass example_inputs: the group carries none to check on")
    call = as_call(inputs)
    if any(isinstance(t, Tensor) and t.is_meta for t in (*call[0], *call[1].values())):
        raise GaugeError(
            "the example inputs are on the meta device (they have no values): pass real "
            "inputs of the same shapes"
        )
    with torch.no_grad():
        checked = self_check(model, call, group, seed=seed)
    return dataclasses.replace(
        group,
        factors=checked.factors,
        breakers=checked.breakers,
        unchecked=None,
        example_inputs=inputs,
    )
