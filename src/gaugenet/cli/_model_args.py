"""Shared pieces of the commands that take a MODEL: loading it and making sample inputs."""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import nn

from .._errors import GaugeError

__all__ = ["INPUT_SHAPE_HELP", "parse_shape", "sample_inputs", "spinner"]

INPUT_SHAPE_HELP = "Shape of one input without the batch, e.g. 1,28,28 (default: inferred)."


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """`"1,28,28"` to `(1, 28, 28)`; `None` stays `None`."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise GaugeError(f"--input-shape {text!r}: expected integers such as 1,28,28") from None
    if not shape or min(shape) <= 0:
        raise GaugeError(f"--input-shape {text!r}: expected positive integers such as 1,28,28")
    return shape


def sample_inputs(
    model: nn.Module, n: int, seed: int = 0, shape: tuple[int, ...] | None = None
) -> Any:
    """A batch of `n` inputs for `model`: of the given per-sample `shape` when there is one,
    from the model's `example_inputs(n)` method or attribute when it has one, token ids for
    Hugging Face models, else inferred from the first layer."""
    g = torch.Generator().manual_seed(seed)
    if shape is not None:
        dtype = next(model.parameters()).dtype
        return torch.randn(n, *shape, generator=g, dtype=dtype)
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


def spinner(console: Console) -> Progress:
    """A transient spinner with the current step's description and the elapsed time."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
