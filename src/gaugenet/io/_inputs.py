"""Sample inputs for a model whose input shape the caller may not know."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._errors import GaugeError
from ._hf import feature_input, token_call, token_lengths

__all__ = ["MAX_INPUT_NUMBERS", "sample_inputs"]

#: The most numbers the sample inputs may hold (about 400 MB in float64).
MAX_INPUT_NUMBERS = 50_000_000


def _check_size(n: int, shape: tuple[int, ...], option: str) -> None:
    if n * math.prod(shape) > MAX_INPUT_NUMBERS:
        raise GaugeError(
            f"{n} sample inputs of shape {shape} hold {n * math.prod(shape):.3g} numbers (at "
            f"most {MAX_INPUT_NUMBERS:.0e}): use fewer {option} or a smaller --input-shape"
        )


def sample_inputs(
    model: nn.Module, n: int, seed: int = 0, shape: tuple[int, ...] | None = None
) -> Any:
    """A batch of `n` inputs for `model`: of the given per-sample `shape` when there is one,
    from the model's `example_inputs(n)` method or attribute when it has one, token ids for
    Hugging Face language models (`_tokens`), images of the config's size for its vision
    models, log-mel features for its speech encoders (`feature_input`), else inferred from the
    first layer."""
    g = torch.Generator().manual_seed(seed)
    if n < 1:
        raise GaugeError(f"the number of sample inputs must be at least 1, got {n}")
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        raise GaugeError(
            f"{type(model).__name__} has no floating-point parameters: pass a float model"
        )
    dtype = params[0].dtype
    if shape is not None:
        if any(not isinstance(d, int) or d <= 0 for d in shape):
            raise GaugeError(f"input shape {tuple(shape)}: expected positive integers")
        _check_size(n, shape, "--inputs")
        return torch.randn(n, *shape, generator=g, dtype=dtype)
    if hasattr(model, "example_inputs"):
        ex = model.example_inputs
        return ex(n) if callable(ex) else ex
    config = getattr(model, "config", None)
    feature = feature_input(config, model)
    if feature is None and config is not None and hasattr(config, "vocab_size"):
        return _tokens(model, config, n, g)
    if feature is not None:  # images (ViT and kin), log-mel features (Whisper's encoder)
        _check_size(n, feature[1], "--inputs")
        return torch.randn(n, *feature[1], generator=g, dtype=dtype)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return torch.randn(n, m.in_features, generator=g, dtype=dtype)
        if isinstance(m, nn.Conv1d):
            return torch.randn(n, m.in_channels, 16, generator=g, dtype=dtype)
        if isinstance(m, nn.Conv2d):
            return torch.randn(n, m.in_channels, 16, 16, generator=g, dtype=dtype)
    raise GaugeError(
        f"cannot infer inputs for {type(model).__name__}: pass --input-shape (one input "
        "without the batch, e.g. 1,28,28), or give the model an `example_inputs(n)` method"
    )


def _tokens(model: nn.Module, config: Any, n: int, g: torch.Generator) -> Any:
    """`n` token sequences for a Hugging Face model: of the longest length of `token_lengths`
    that the model runs (one sequence tried per length), with decoder tokens for an
    encoder-decoder (`token_call`)."""
    lengths = token_lengths(config)
    for length in lengths:
        ids = torch.randint(0, config.vocab_size, (n, length), generator=g)
        try:
            with torch.no_grad():
                call = token_call(config, ids[:1])
                model(**call) if isinstance(call, dict) else model(call)
        except Exception:  # any failure means: not this length; try a shorter one
            continue
        return token_call(config, ids)
    ids = torch.randint(0, config.vocab_size, (n, lengths[0]), generator=g)
    return token_call(config, ids)  # none runs: the caller's own check says why
