"""Choosing among candidate gauge elements on validation data, the identity among them.

The calibration objective (the rounded model's output noise on a few calibration inputs)
picks and refines the element; minimized hard on little data it overfits, and the element
it prefers can be worse than plain rounding on other inputs. `select` is the guard: every
candidate (the identity first, then closed-form balances, smoothing scales, the searched
and the learned elements) is scored on separate validation inputs, and the lowest wins.
Because the identity is always a candidate and replaced only by a strictly lower score,
the chosen element is never worse than plain rounding on the validation objective.

Validation data is finite too: picking the lowest of many candidates whose scores differ by
less than their noise favours whichever the noise flattered most (the winner's curse), and
the more a candidate was fitted to the calibration inputs, the more room it has to be
flattered. `select_simplest` applies the one-standard-error rule of model selection
(Breiman et al., 1984): among the candidates no worse than plain rounding, it takes the
first, in order of how much was fitted to data, whose validation score is within one
standard error of the lowest, the standard error estimated from the paired differences over
contiguous folds of the validation inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import GaugeError
from ..groups import Element
from ..groups._base import State

__all__ = ["Candidate", "fold_scores", "select", "select_simplest"]

#: contiguous folds of the validation inputs for the standard error
FOLDS = 10


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
    cands = [identity, *others]
    totals = [float(objective(identity.state))]
    _check_identity(totals[0])
    totals += [float(objective(c.state)) for c in others]
    return cands[_lowest(totals)], _scores(cands, totals)


def _check_identity(total: float) -> None:
    if not math.isfinite(total):
        raise GaugeError(
            f"the validation objective of the identity is {total}: nothing to compare with"
        )


def _lowest(totals: Sequence[float]) -> int:
    """The index of the lowest finite total; `0` (the identity) unless one is strictly
    lower, the first of equal ones otherwise."""
    best = 0
    for i, t in enumerate(totals):
        if math.isfinite(t) and t < totals[best]:
            best = i
    return best


def _scores(cands: Sequence[Candidate], totals: Sequence[float]) -> dict[str, float]:
    """Each label's total (the first of a repeated label)."""
    scores: dict[str, float] = {}
    for c, t in zip(cands, totals):
        scores.setdefault(c.label, t)
    return scores


def fold_scores(
    y_q: Tensor, y: Tensor, distance: Callable[[Tensor, Tensor], Tensor], folds: int
) -> Tensor:
    """`distance` with the outputs `y_q` kept on one contiguous fold of the batch axis and
    the reference `y` elsewhere, for each of `folds` folds, float64 `(folds,)`.

    For a distance that sums over rows, the difference of two candidates' fold scores is
    their difference on that fold's rows alone, whatever the distance gives the reference
    rows (a next-token loss that ignores `y` adds the same constant to both)."""
    rows = torch.arange(y_q.shape[0]).tensor_split(folds)
    out = []
    for idx in rows:
        mixed = y.clone()
        mixed[idx] = y_q[idx]
        out.append(float(distance(mixed, y)))
    return torch.tensor(out, dtype=torch.float64)


def select_simplest(
    identity: Candidate,
    others: Sequence[Candidate],
    outputs: Callable[[Candidate], Tensor],
    reference: Tensor,
    distance: Callable[[Tensor, Tensor], Tensor],
    *,
    folds: int = FOLDS,
) -> tuple[Candidate, dict[str, float], str]:
    """The one-standard-error choice: the first candidate, the identity first and `others`
    in order of how much was fitted to calibration data, whose validation score is at most
    the identity's and within one standard error of the lowest score.

    The standard error of candidate `c` is that of its total difference to the lowest,
    `sqrt(k) · sd_j(d_j)` over the paired fold differences `d_j` (`fold_scores`, `k`
    contiguous folds of the batch axis: neighbouring inputs, windows of one text, say,
    are correlated, and a fold keeps them together). The rule is checked as it is used:
    when the fold differences do not add up to the total difference (a distance that does
    not sum over rows), or there are fewer than 3 rows, it falls back to the lowest score
    (`select`) and says so.

    **Arguments:** `outputs(c)` the rounded model's outputs for candidate `c` `(rows,
    ...)`; `reference` the float model's outputs; `distance(y_q, y)` the validation score
    (lower is better).

    **Returns:** `(chosen, scores, why)`: `scores` maps each label to its total score
    (first of a repeated label), `why` one phrase on how the choice was made.
    """
    cands = [identity, *others]
    totals, per_fold = [], []
    rows = reference.shape[0] if reference.dim() else 1
    k = min(folds, rows)
    for c in cands:
        y_q = outputs(c)
        totals.append(float(distance(y_q, reference)))
        per_fold.append(fold_scores(y_q, reference, distance, k) if k >= 3 else None)
    _check_identity(totals[0])
    scores = _scores(cands, totals)
    low = _lowest(totals)
    if low == 0:
        return identity, scores, "lowest"
    if k < 3:
        return cands[low], scores, f"lowest ({rows} rows: no standard error)"
    for i, total in enumerate(totals):
        if not math.isfinite(total) or total > totals[0]:
            continue
        d = per_fold[i] - per_fold[low]
        gap = totals[i] - totals[low]
        if not math.isclose(float(d.sum()), gap, rel_tol=1e-6, abs_tol=1e-9 * abs(totals[low])):
            return cands[low], scores, "lowest (the distance does not sum over rows)"
        se = math.sqrt(k) * float(d.std()) if i != low else 0.0
        if gap <= se:
            why = "lowest" if i == low else f"within one standard error ({se:.3g}) of the lowest"
            return cands[i], scores, why
    return cands[low], scores, "lowest"  # unreachable: the lowest is within 0 of itself
