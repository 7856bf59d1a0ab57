"""Example inputs: normalizing what the caller gives, and finding some when none are given.

`symmetries` accepts one tensor, a tuple (or list) of positional inputs, or a dict of
keyword inputs (`input_ids`, `attention_mask`, `pixel_values`, ...). Internally a call is
always `(args, kwargs)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import GaugeError

__all__ = ["Call", "as_call", "find_inputs", "run", "without_cache"]

#: positional inputs and keyword inputs of one call of a model
Call = tuple[tuple[Any, ...], dict[str, Any]]


def as_call(example_inputs: Any) -> Call:
    """`(args, kwargs)` from a tensor, a tuple / list of inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def without_cache(model: nn.Module, call: Call) -> Call:
    """`call` with `use_cache=False` added when `forward` takes a `use_cache` input (the
    Hugging Face convention) and the call does not set it, for capture only.

    The key-value cache such a model returns for incremental decoding is no output of its
    function: it holds keys and values that its own layers write and read back, so a
    transformed model reads its own transformed cache. Returned as an output, it would also
    stop `torch.export`, which cannot flatten the cache object.
    """
    args, kwargs = call
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return call
    if "use_cache" not in params or "use_cache" in kwargs:
        return call
    names = list(params)
    if names.index("use_cache") < len(args):  # given positionally
        return call
    return args, {**kwargs, "use_cache": False}


def run(model: nn.Module, call: Call) -> Any:
    args, kwargs = call
    return model(*args, **kwargs)


def _dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float64


def _candidates(model: nn.Module) -> Iterator[Call]:
    dtype = _dtype(model)
    g = torch.Generator().manual_seed(0)
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is not None:
        yield (torch.randn(2, first.in_features, generator=g, dtype=dtype),), {}
    # the input convention of Hugging Face models (token ids, pixel values, ...)
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict) and all(isinstance(v, Tensor) for v in dummy.values()):
        yield (), dict(dummy)
    # tokens of every width a parameter has, given once or as (query, key, value)
    widths = list(dict.fromkeys(p.shape[-1] for p in model.parameters() if p.ndim >= 1))[:8]
    tokens = {d: torch.randn(2, 3, d, generator=g, dtype=dtype) for d in widths}
    for x in tokens.values():
        yield (x,), {}
        yield (x, x, x), {}
    for d, x in tokens.items():  # queries of one width, keys and values of another
        for e, y in tokens.items():
            if e != d:
                yield (x, y, y), {}


def find_inputs(model: nn.Module, *, move: Callable[[Call], Call] | None = None) -> Call:
    """Example inputs the model accepts, for a model given without them.

    Tries, in order: a batch for the first `nn.Linear`, the model's `dummy_inputs` (the
    Hugging Face convention), and token batches `(2, 3, d)` for the widths `d` of its
    parameters (once, or as query, key and value, the keys and values possibly of another
    width). `move` maps each candidate before it is tried (e.g. to the meta device).
    Raises `GaugeError` when none runs.
    """
    was = model.training
    model.eval()
    try:
        for call in _candidates(model):
            call = move(call) if move is not None else call
            try:
                with torch.no_grad():
                    run(model, call)
            except Exception:  # any failure means: not this input; try the next
                continue
            return call
    finally:
        model.train(was)
    raise GaugeError(
        f"{type(model).__name__}: pass example_inputs; no input the model accepts could be "
        "inferred (they are needed to capture the graph and to check every factor)"
    )
