"""Rescaling a gain stored with an offset: `w` read as `g = w + c` (Gemma's RMSNorm gain
`x̂ · (1 + w)`, `c = 1`).

The effective gain `g` scales like any gain, `g ↦ α g`, so the stored entry moves by
`w ↦ α (w + c) − c`. This is an action of the positive scales: `α` then `β` give
`β (α (w + c) − c + c) − c = αβ (w + c) − c`, and `α = 1` is the identity. Its tangent at
`w` is `(w + c) ξ`, not `w ξ`: a multiplicative `w ↦ α w` changes `g` to `α w + c`, which
is no rescaling of `g` (its readers cannot take it back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import GaugeError
from ._base import State
from ._rescaling import Scale

__all__ = ["OffsetScale"]


@dataclass(frozen=True)
class OffsetScale(Scale):
    """`state[param] ↦ (state[param] + offset) · alpha_ext[index] ** power − offset`.

    As `Scale` (`index` broadcastable to the parameter's shape, values in `[0, n]`, `n`
    meaning unscaled), for a parameter read as `param + offset` (`offset` a finite nonzero
    number). Entries with index `n` are left exactly as they are.
    """

    offset: float

    def __post_init__(self) -> None:
        if isinstance(self.offset, bool) or not isinstance(self.offset, (int, float)):
            raise GaugeError(
                f"OffsetScale({self.param!r}): the offset must be a number, "
                f"got {type(self.offset).__name__}"
            )
        if not math.isfinite(self.offset) or self.offset == 0:
            raise GaugeError(
                f"OffsetScale({self.param!r}): the offset must be finite and nonzero "
                f"(a zero offset is a plain Scale), got {self.offset}"
            )

    def value(self, p: Tensor) -> Tensor:
        """The effective gain `p + offset`: what the scales multiply."""
        return p + self.offset

    def __call__(self, new: State, alpha_ext: Tensor) -> None:
        if self.param not in new:
            raise GaugeError(f"OffsetScale: the state has no entry {self.param!r}")
        w = new[self.param]
        try:
            shape = torch.broadcast_shapes(self.index.shape, w.shape)
        except RuntimeError:
            shape = None
        if shape != w.shape:
            raise GaugeError(
                f"OffsetScale({self.param!r}): index of shape {tuple(self.index.shape)} does "
                f"not broadcast to the parameter's shape {tuple(w.shape)}"
            )
        a = alpha_ext[self.index].to(w.dtype) ** self.power
        moved = (w + self.offset) * a - self.offset
        # entries of no scale (index `n`, the appended one) keep their exact value: the
        # round trip through `w + c` would round them
        unscaled = self.index == alpha_ext.shape[0] - 1
        new[self.param] = torch.where(unscaled, w, moved)
