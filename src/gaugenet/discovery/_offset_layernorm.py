"""LayerNorms whose gain is stored with an offset: `F.layer_norm(x, shape, w + c, β, ε)`
(Nemotron's `LayerNorm1P`, `c = 1`), the gain `γ = w + c` with `w` the parameter.

Such a norm is a LayerNorm of gain `γ`: every LayerNorm rule holds for it with `γ` read as
`w + c` (the per-feature scale moves `w ↦ α (w + c) − c`, as `groups/_offset_scale.py`
says; the kernel direction is `1/(w + c)`; the offset group and the stream rotation
conjugate by `w + c`). The analysis sees the module through a view
(`_functional_norms.with_modules`) holding an `OffsetGainLayerNorm`: an `nn.LayerNorm`
over the same parameter objects whose `forward` computes with `weight + gain_offset`, and
the rules read the effective gain through `gain_offset` and `effective_gain`.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, fx, nn

from ._ops import ADDITIONS, graph_users

__all__ = ["OffsetGainLayerNorm", "effective_gain", "gain_offset", "offset_weight"]


class OffsetGainLayerNorm(nn.LayerNorm):
    """`F.layer_norm(x, normalized_shape, weight + gain_offset, bias, eps)`: a view of a
    module whose gain is stored with an offset (built by `_functional_norms.py` from the
    module's computation, never from its class)."""

    gain_offset: float

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(
            x, self.normalized_shape, self.weight + self.gain_offset, self.bias, self.eps
        )


def gain_offset(ln: nn.Module) -> float:
    """The constant `c` of a LayerNorm's gain `w + c` (`0.0` for a gain read as stored)."""
    return float(getattr(ln, "gain_offset", 0.0))


def effective_gain(ln: nn.Module) -> Tensor | None:
    """A LayerNorm's gain `γ = weight + gain_offset` (detached), `None` without a weight."""
    w = getattr(ln, "weight", None)
    if w is None:
        return None
    c = gain_offset(ln)
    return w.detach() + c if c else w.detach()


def offset_weight(a: Any) -> tuple[Any, float]:
    """`(w, c)` when `a` is `w + c` (either order; `c` a finite nonzero number, `w` a
    `get_attr` node) and only one node reads the sum and only the sum reads `w`;
    `(a, 0.0)` otherwise."""
    if not (
        isinstance(a, fx.Node)
        and a.op == "call_function"
        and a.target in ADDITIONS
        and len(a.args) == 2
        and not a.kwargs
        and len(graph_users(a)) == 1
    ):
        return a, 0.0
    w, c = a.args
    if _number(w):
        w, c = c, w
    if not (_number(c) and isinstance(w, fx.Node) and w.op == "get_attr"):
        return a, 0.0
    if len(graph_users(w)) != 1:
        return a, 0.0
    return w, float(c)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x != 0
