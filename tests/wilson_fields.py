"""Test helpers shared by the Wilson-line tests: the smooth field and the relative error."""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def field(d: int, gen: torch.Generator, scale: float = 1.0):
    """`w(t) = A₀ + sin(3t) A₁ + cos(5t) A₂` with random `(d, d)` matrices of unit gain (times
    `scale`), batched over `t`."""
    A = scale * torch.randn(3, d, d, dtype=F64, generator=gen) / math.sqrt(d)

    def w(t):
        return (
            A[0] + torch.sin(3 * t)[:, None, None] * A[1] + torch.cos(5 * t)[:, None, None] * A[2]
        )

    return w


def rel(a, b):
    """Largest entry of `a − b` relative to the largest entry of `b`."""
    return float((a - b).abs().max() / b.abs().max())
