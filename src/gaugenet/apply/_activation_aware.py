"""Activation-aware scales (AWQ): the weights of busy input channels kept large.

Rounding a weight column adds noise that its input feature multiplies, so a channel whose
input is large on average costs the most. AWQ (Lin et al., 2024) scales such columns up
before rounding (`W diag(s)`, the input divided by `s` where it is produced, a gauge
transformation) with `s_k = x̄_k^a`, `x̄_k` the mean magnitude of input feature `k` on the
calibration data, and picks the exponent `a` per layer on a grid. Here the layers are the
rescaling factors of the discovered group that scale the input columns of quantized
layers, found without a table of layer names, and `a` is picked per factor on the rounded
model's output objective, one factor at a time. A single exponent per factor, not a scale
per channel, is what keeps the choice from fitting the calibration inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor

from .._errors import GaugeError
from ..groups import RescalingFactor
from ..groups._base import State
from ._search import column_channels

__all__ = ["GRID", "activation_aware_scales", "activation_aware_search"]

#: the exponents `a` tried per factor (AWQ's grid of 20 ratios in `[0, 1)`, every other one)
GRID = tuple(i / 10 for i in range(10))


def activation_aware_scales(
    factor: RescalingFactor,
    state: State,
    means: dict[str, Tensor],
    exponent: float,
    transposed: Collection[str] = frozenset(),
) -> Tensor:
    """The scales `α` `(factor.n,)` that multiply the input columns `J_k` of the quantized
    layers the factor reads into by `s_k = x̄_k^a / sqrt(max x̄^a · min x̄^a)` (AWQ's scales,
    normalized so that their geometric range is centered on 1), `x̄_k` the largest mean input
    magnitude over those columns; channels that scale no such column keep 1 (`transposed`:
    the weights stored `(in, out)`, as in `column_channels`)."""
    return _scales(factor.n, column_channels(factor, state, means, transposed), exponent)


def _scales(n: int, found: tuple[int, Tensor, Tensor] | None, exponent: float) -> Tensor:
    """`activation_aware_scales` from a factor's `column_channels` (`found`), `(n,)`."""
    if not 0 <= exponent <= 1:
        raise GaugeError(f"activation-aware exponent must be in [0, 1], got {exponent}")
    log_a = torch.zeros(n, dtype=torch.float64)
    if found is None:
        return torch.exp(log_a)
    power, _, xk = found
    ok = xk > 0
    if ok.any():
        s = exponent * xk[ok].log()
        s = s - (s.max() + s.min()) / 2
        log_a[ok] = s / power
    return torch.exp(log_a)


def activation_aware_search(
    factors: Sequence[RescalingFactor],
    state: State,
    means: dict[str, Tensor],
    err: Callable[[State], float],
    grid: Sequence[float] = GRID,
    transposed: Collection[str] = frozenset(),
) -> tuple[list[Tensor], State, float]:
    """One pass over `factors`: each takes the exponent of `grid` whose scales give the
    lowest `err` with the factors before it at their choice (`a = 0`, the identity, is
    in the grid, so `err` never rises).

    **Returns:** `(scales, state, err)`, one `(factor.n,)` tensor per factor."""
    best = err(state)
    out = []
    for f in factors:
        choice = torch.ones(f.n, dtype=torch.float64)
        found = column_channels(f, state, means, transposed)
        if found is not None:
            chosen_state = state
            for a in grid:
                if a == 0:
                    continue
                alpha = _scales(f.n, found, a)
                trial = f.apply(state, alpha)
                e = err(trial)
                if e < best:
                    best, choice, chosen_state = e, alpha, trial
            state = chosen_state
        out.append(choice)
    return out, state, best
