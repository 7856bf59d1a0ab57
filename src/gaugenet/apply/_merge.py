"""Merging models by averaging their weights in a common gauge, and the loss barrier between two.

Two networks trained from different seeds sit in different points of (almost) the same
gauge orbits: units are permuted and rescaled. Averaging their weights directly mixes
unrelated units. `align_to` moves a model, within its gauge group, as close as possible to
a reference: permutations by weight matching (a linear assignment per permutation factor,
coordinate-wise over factors until none changes), rescalings by minimizing the squared
weight distance in log-scales. Every step is a gauge transformation, so the aligned model
computes the same function.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call

from .._canonical import canonicalize
from .._errors import GaugeError
from ..discovery import symmetries
from ..groups import Element, GaugeGroup, PermutationFactor, RescalingFactor, model_state
from ..groups._group import load_state
from ._match import match_continuous, match_rotations, minimize, state_distance

__all__ = ["ALIGNMENTS", "align_pair", "align_to", "interpolation_barrier", "loss_curve", "merge"]

ALIGNMENTS = ("none", "permutation", "permutation+gauge", "full")


def _items(p: Tensor, axis: int, entries: Tensor) -> Tensor:
    """The slices of `p` along `axis` that belong to each item: `(n, -1)`."""
    return p.movedim(axis, 0)[entries].reshape(entries.shape[0], -1)


def match_permutations(
    group: GaugeGroup, reference: dict, state: dict, *, max_rounds: int = 30
) -> Element:
    """Weight matching: the permutations bringing `state` closest (in summed inner product of
    the weights each item owns) to `reference`."""
    perms = [f for f in group.factors if isinstance(f, PermutationFactor)]
    elem = {f.name: f.identity() for f in perms}
    for _ in range(max_rounds):
        changed = False
        for f in perms:
            others = {k: v for k, v in elem.items() if k != f.name}
            cur = group.act_state(state, others, validate=False)
            cost = torch.zeros(f.n, f.n, dtype=torch.float64)
            for t in f.terms:
                a = _items(reference[t.param].double(), t.axis, t.entries)
                b = _items(cur[t.param].double(), t.axis, t.entries)
                cost += a @ b.T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            p = torch.as_tensor(cols, dtype=torch.long)
            changed |= not torch.equal(p, elem[f.name])
            elem[f.name] = p
        if not changed:
            break
    return elem


def match_rescalings(
    group: GaugeGroup, reference: dict, state: dict, *, steps: int = 200
) -> Element:
    """The rescalings minimizing `Σ ‖act(state, α)[p] − reference[p]‖²` over the parameters
    they touch (convex-ish in `log α`; solved with L-BFGS from `α = 1`)."""
    factors = [f for f in group.factors if isinstance(f, RescalingFactor)]
    if not factors:
        return {}
    sub = GaugeGroup(tuple(factors))
    touched = sorted({p for f in factors for p in f.params()})
    st = {k: v.double() for k, v in state.items()}
    ref = {p: reference[p].double() for p in touched}
    norm = sum(float((ref[p] ** 2).sum()) for p in touched) or 1.0
    logs = torch.zeros(sum(f.n for f in factors), dtype=torch.float64, requires_grad=True)
    sizes = [f.n for f in factors]

    def loss() -> Tensor:
        parts = torch.split(logs, sizes)
        new = sub.act_state(
            st, {f.name: torch.exp(x) for f, x in zip(factors, parts)}, validate=False
        )
        return sum(((new[p] - ref[p]) ** 2).sum() for p in touched) / norm

    minimize([logs], loss, steps)
    parts = torch.split(logs.detach(), sizes)
    return {f.name: torch.exp(x) for f, x in zip(factors, parts)}


def _match_full(group: GaugeGroup, reference: dict, model: nn.Module, rounds: int) -> nn.Module:
    """Weight matching over the whole group: permutations first, then `rounds` sweeps of
    orthogonal factors (closed form), the other continuous factors (least squares) and the
    permutations again. A step is kept only if it does not increase the distance, so the
    result is never farther from `reference` than permutation matching alone."""
    current = group.act(model, match_permutations(group, reference, model_state(model)))
    dist = state_distance(reference, model_state(current))
    for _ in range(rounds):
        for step in (match_rotations, match_continuous, match_permutations):
            g = step(group, reference, model_state(current))
            if not g:
                continue
            moved = group.act(current, g)
            d = state_distance(reference, model_state(moved))
            if d <= dist:
                current, dist = moved, d
    return current


def align_to(
    reference: nn.Module,
    model: nn.Module,
    example_inputs: Any = None,
    *,
    align: str = "permutation+gauge",
    group: GaugeGroup | None = None,
    rounds: int = 2,
) -> nn.Module:
    """`model` moved within its gauge group to sit as close as possible to `reference`.

    **Arguments:**

    - `reference`, `model`: two models of one architecture (neither is modified).
    - `example_inputs`: inputs to trace the architecture with (`gaugenet.symmetries`).
    - `align`: `"none"` (a copy), `"permutation"` (weight matching of units/channels/heads
      alone), `"permutation+gauge"` (also the continuous factors: the model is first
      brought to the canonical gauge, then permutations and rescalings are matched in
      `rounds` alternations) or `"full"` (weight matching over the whole group: after the
      permutations, orthogonal factors by Procrustes and every other continuous factor,
      per-head attention `GL` included, by least squares, in `rounds` sweeps; never
      farther from `reference` than `"permutation"`).

    **Returns:** the aligned model; it computes the same function as `model`.
    """
    if align not in ALIGNMENTS:
        raise GaugeError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    if align == "none":
        return copy.deepcopy(model)
    group = symmetries(model, example_inputs) if group is None else group
    group.check_model(reference)
    group.check_model(model)
    ref = model_state(reference)
    if align == "permutation":
        return group.act(model, match_permutations(group, ref, model_state(model)))
    if align == "full":
        return _match_full(group, ref, model, rounds)
    current = canonicalize(model, example_inputs=example_inputs, group=group)
    for _ in range(rounds):
        current = group.act(current, match_permutations(group, ref, model_state(current)))
        current = group.act(current, match_rescalings(group, ref, model_state(current)))
    return current


def _copy_with(model: nn.Module, state: dict) -> nn.Module:
    out = copy.deepcopy(model)
    load_state(out, state)
    return out


def align_pair(
    model_a: nn.Module,
    model_b: nn.Module,
    example_inputs: Any = None,
    *,
    align: str = "permutation+gauge",
    group: GaugeGroup | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Both models in a common gauge: `(a', b')` with `a'` equivalent to `model_a` (its
    canonical form for `"permutation+gauge"`, itself otherwise) and `b' = align_to(a', b)`."""
    if align not in ALIGNMENTS:
        raise GaugeError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    group = symmetries(model_a, example_inputs) if group is None else group
    group.check_model(model_a)
    group.check_model(model_b)
    first = model_a
    if align == "permutation+gauge":
        first = canonicalize(model_a, example_inputs=example_inputs, group=group)
    return first, align_to(first, model_b, example_inputs, align=align, group=group)


def merge(
    models: Sequence[nn.Module],
    example_inputs: Any = None,
    *,
    align: str = "permutation+gauge",
    group: GaugeGroup | None = None,
) -> nn.Module:
    """The average of `models` after bringing each to the gauge of the first.

    With `align="permutation+gauge"` the first model is put in the canonical gauge
    (`gaugenet.canonicalize`) and every other model is aligned to it (`align_to`);
    `"permutation"` matches units alone; `"none"` averages as they are.

    **Returns:** a new model whose parameters and floating buffers are the plain average.
    Raises `GaugeError` when the models differ in layout or computation (a ReLU and a GELU
    network of equal shapes, say): their weights have no common gauge to average in.
    """
    if len(models) < 1:
        raise GaugeError("merge needs at least one model")
    group = symmetries(models[0], example_inputs) if group is None else group
    for m in models:  # a model of another architecture or computation: no common gauge
        group.check_model(m)
    first = align_pair(models[0], models[0], example_inputs, align=align, group=group)[0]
    aligned = [first] + [
        align_to(first, m, example_inputs, align=align, group=group) for m in models[1:]
    ]
    states = [model_state(m) for m in aligned]
    avg = {
        k: (sum(s[k] for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    return _copy_with(first, avg)


def loss_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    loss: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    n_points: int = 11,
) -> tuple[Tensor, Tensor]:
    """Loss along the straight line `θ(t) = (1 − t) θ_a + t θ_b`, `t ∈ [0, 1]`.

    **Returns:** `(t, losses)`, both `(n_points,)` float64.
    """
    x, y = data
    sa, sb = model_state(model_a), model_state(model_b)
    if sa.keys() != sb.keys():
        raise GaugeError("the two models have different parameter names")
    ts = torch.linspace(0, 1, n_points, dtype=torch.float64)
    out = []
    with torch.no_grad():
        for t in ts.tolist():  # a handful of points along the path, each a full batch
            st = {
                k: (1 - t) * sa[k] + t * sb[k] if sa[k].is_floating_point() else sa[k] for k in sa
            }
            out.append(float(loss(functional_call(model_a, st, (x,)), y)))
    return ts, torch.tensor(out, dtype=torch.float64)


def interpolation_barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    loss: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    n_points: int = 11,
) -> float:
    """The loss barrier on the linear path: `max_t [L(θ(t)) − ((1 − t) L(θ_a) + t L(θ_b))]`.

    **Arguments:** `data`: `(inputs, targets)`; `loss(outputs, targets)` a scalar.

    **Returns:** the barrier (`0` for models in one convex basin of the loss).
    """
    ts, losses = loss_curve(model_a, model_b, data, loss=loss, n_points=n_points)
    line = (1 - ts) * losses[0] + ts * losses[-1]
    return float((losses - line).max())
