"""Figures of merit for quantized and merged models."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["accuracy", "cosine_similarity", "sqnr_db"]


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio `10 log10(Σ ref² / Σ (ref - test)²)` in dB (float64).

    **Arguments:** `reference`, `test`: tensors of the same shape.

    **Returns:** the ratio in dB; `inf` when they are equal.
    """
    r, t = reference.detach().double(), test.detach().double()
    noise = float(((r - t) ** 2).sum())
    signal = float((r**2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows of `logits` `(N, classes)` whose argmax equals `labels` `(N,)`."""
    return float((logits.argmax(-1) == labels).double().mean())


def cosine_similarity(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity of the rows of `a` and `b` `(N, d)`, in float64."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def first_tensor(model: torch.nn.Module, inputs) -> Tensor:
    """The first tensor `model` returns on `inputs` (a tensor, tuple, or dict of keywords)."""
    with torch.no_grad():
        if isinstance(inputs, dict):
            out = model(**inputs)
        else:
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    while not isinstance(out, Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
    return out
