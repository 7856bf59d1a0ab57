"""Channel ranges of the quantized tensors a gauge factor touches, and their balance.

A rescaling factor multiplies channel `k` of each tensor it touches by `α_k^power`; a GL
factor restricted to its diagonal does the same with `power = ±1` along the axis of each
`MatTerm`. This module reduces every such term to one vector of normalized channel ranges,
which is all the closed-form range equalization needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..groups import BatchNormShift, GLFactor, RescalingFactor, Scale
from ..groups._base import State

__all__ = ["balance", "factor_ranges"]

# MatTerm modes with a diagonal G: "G" and "T" scale entry i by g_i, "inv"/"invT" by 1/g_i.
_GL_POWER = {"G": 1, "T": 1, "inv": -1, "invT": -1}


def _normalized(p: Tensor, per_channel: bool, normalize: bool = True) -> Tensor:
    """`|p|` divided by the range its quantizer uses (tensor max, or max of its row)."""
    a = p.abs()
    if not normalize:
        return a
    if per_channel and a.dim() > 0:
        r = a.reshape(a.shape[0], -1).amax(1).clamp_min(1e-300)
        return a / r.reshape(-1, *([1] * (a.dim() - 1)))
    return a / a.max().clamp_min(1e-300)


def _scale_ranges(
    t: Scale, state: State, n: int, per_channel: bool, normalize: bool, transposed: bool
) -> Tensor | None:
    p = state[t.param]
    idx = t.index.expand(p.shape)
    if transposed:  # stored `(in, out)`: its quantizer's rows are the columns
        p, idx = p.transpose(0, 1), idx.transpose(0, 1)
    if per_channel and p.dim() > 1:
        rows = idx.reshape(p.shape[0], -1)
        # a channel that owns whole rows is absorbed by its row's own quantization step
        if bool((rows == rows[:, :1]).all()):
            return None
    a = _normalized(p, per_channel, normalize).reshape(-1)
    out = torch.zeros(n + 1, dtype=a.dtype)
    return out.scatter_reduce(0, idx.reshape(-1), a, "amax")[:n]


def _mat_ranges(
    t, state: State, b: int, d: int, per_channel: bool, normalize: bool, transposed: bool
) -> Tensor | None:
    p, axis = state[t.param], t.axis
    if transposed:  # stored `(in, out)`: its quantizer's rows are the columns
        p, axis = p.transpose(0, 1), 1 - axis
    if per_channel and axis == 0:
        return None
    a = _normalized(p, per_channel, normalize).movedim(axis, 0).reshape(p.shape[axis], -1).amax(1)
    return a[t.index(b, d).reshape(-1)]  # blocks strided or on listed rows too


def factor_ranges(
    factor: RescalingFactor | GLFactor,
    state: State,
    quantized: set[str],
    per_channel: bool,
    normalize: bool = True,
    transposed: set[str] | frozenset[str] = frozenset(),
) -> tuple[Tensor, Tensor]:
    """Largest normalized range of each channel over the quantized tensors the factor scales
    up (`power > 0`) and down (`power < 0`). A weight named in `transposed` is stored
    `(in, out)` (`transposed_params`): its quantizer's output channels are its columns.

    **Returns:** `(up, down)`, each `(n,)` (rescaling) or `(b·d,)` (GL, head-major); `0`
    where no quantized tensor is scaled that way.
    """
    size = factor.n if isinstance(factor, RescalingFactor) else factor.b * factor.d
    up = torch.zeros(size, dtype=torch.float64)
    down = torch.zeros(size, dtype=torch.float64)
    for t in factor.terms:
        if isinstance(t, BatchNormShift) or t.param not in quantized:
            continue  # norms and biases stay in float: they cost nothing to rescale
        if isinstance(t, Scale):
            flip = t.param in transposed
            r = _scale_ranges(t, state, factor.n, per_channel, normalize, flip)
            power = t.power
        else:
            r, power = (
                _mat_ranges(
                    t, state, factor.b, factor.d, per_channel, normalize, t.param in transposed
                ),
                _GL_POWER[t.mode],
            )
        if r is None or power == 0:
            continue
        side = up if power > 0 else down
        torch.maximum(side, r.double() ** (1 / abs(power)), out=side)
    return up, down


def balance(up: Tensor, down: Tensor) -> Tensor:
    """The closed-form scales: `sqrt(down/up)` equalizes a channel's normalized range on both
    sides; with one side quantized the channel is stretched to the full range of that side
    (`1/up` or `down`); a channel no quantized tensor sees keeps `1`."""
    alpha = torch.ones_like(up)
    both, only_up, only_down = (up > 0) & (down > 0), (up > 0) & (down == 0), (up == 0) & (down > 0)
    alpha[both] = torch.sqrt(down[both] / up[both])
    alpha[only_up] = 1 / up[only_up]
    alpha[only_down] = down[only_down]
    return alpha
