"""Choosing among candidate gauge elements on validation data, the identity among them.

The calibration objective (the rounded model's output noise on a few calibration inputs)
picks and refines the element; minimized hard on little data it overfits, and the element
it prefers can be worse than plain rounding on other inputs. `select` is the guard: every
candidate (the identity first, then closed-form balances, smoothing scales, the searched
and the learned elements) is scored on separate validation inputs, and the lowest wins.
Because the identity is always a candidate and replaced only by a strictly lower score,
the chosen element is never worse than plain rounding on the validation objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._errors import GaugeError
from ..groups import Element
from ..groups._base import State

__all__ = ["Candidate", "select"]


@dataclass(frozen=True)
class Candidate:
    """A gauge element with the model state it produces: `label` names where it came from
    (`"identity"`, `"smoothing 0.5"`, `"searched"`, ...), `state` is the model's parameters
    moved by `element` (float64)."""

    label: str
    element: Element
    state: State


def select(
    identity: Candidate,
    others: Sequence[Candidate],
    objective: Callable[[State], float],
) -> tuple[Candidate, dict[str, float]]:
    """The candidate of lowest `objective` (the validation objective), the identity unless
    another scores strictly lower; a candidate scoring NaN or infinity is never chosen.

    **Arguments:**

    - `identity`: the identity element with the model's own state (plain rounding).
    - `others`: the other candidates, in order of preference on ties (first wins).
    - `objective`: `state ↦` scalar, lower is better (e.g. the next-token loss of the
      rounded model on validation text).

    **Returns:** `(chosen, scores)`, `scores` mapping each label to its objective (a
    repeated label keeps its first score).
    """
    if not callable(objective):
        raise GaugeError(f"the validation objective must be callable, got {type(objective)}")
    best = identity
    e_best = float(objective(identity.state))
    if not math.isfinite(e_best):
        raise GaugeError(
            f"the validation objective of the identity is {e_best}: nothing to compare with"
        )
    scores = {identity.label: e_best}
    for c in others:
        e = float(objective(c.state))
        scores.setdefault(c.label, e)
        if math.isfinite(e) and e < e_best:
            best, e_best = c, e
    return best, scores
