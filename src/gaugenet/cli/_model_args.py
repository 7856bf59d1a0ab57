"""Shared pieces of the commands that take a MODEL: loading it and making sample inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import GaugeError

__all__ = ["sample_inputs"]


def sample_inputs(model: nn.Module, n: int, seed: int = 0) -> Any:
    """A batch of `n` inputs for `model`: from its `example_inputs(n)` method or attribute
    when it has one, token ids for Hugging Face models, else inferred from the first layer."""
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "example_inputs"):
        ex = model.example_inputs
        return ex(n) if callable(ex) else ex
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        return torch.randint(0, config.vocab_size, (n, 8), generator=g)
    dtype = next(model.parameters()).dtype
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return torch.randn(n, m.in_features, generator=g, dtype=dtype)
        if isinstance(m, nn.Conv1d):
            return torch.randn(n, m.in_channels, 16, generator=g, dtype=dtype)
        if isinstance(m, nn.Conv2d):
            return torch.randn(n, m.in_channels, 16, 16, generator=g, dtype=dtype)
    raise GaugeError(
        f"cannot infer inputs for {type(model).__name__}: give the model an "
        "`example_inputs(n)` method"
    )
