"""Gauge fixing: canonical representatives of gauge orbits, and aligning two models.

`canonical_element(model)` returns the element `g` with `act(model, g)` canonical:

- rescalings, `gauge="balanced"`: the minimum of the total squared norm of the parameters
  the rescalings touch, i.e. every unit's incoming and outgoing norms are equal. When the
  units decouple (one hidden layer, say) the minimizer is the closed form
  `α = (‖w_out‖² / ‖w_in‖²)^{1/4}`; a deep chain couples neighbouring units and has no
  closed form, so that closed form is the starting point of a Newton solve of the (convex
  in log-scales) problem to machine precision;
- rescalings, `gauge="unit_in"`: every unit's incoming norm is 1, one sweep in graph order
  (closed form);
- other continuous factors: their registered canonicalizers (`register_canonicalizer`);
- permutations: items sorted by decreasing norm of their (canonical) parameters.

The canonical form is idempotent and the same for every point of an orbit (for generic
weights: distinct unit norms, no dead units).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._balance import balanced_scales as _balanced
from ._balance import scale_norms as _scale_norms
from ._errors import GaugeError
from .discovery import symmetries
from .groups import (
    AffineFactor,
    Element,
    GaugeGroup,
    PermutationFactor,
    RescalingFactor,
    Scale,
    TranslationFactor,
    canonicalizer_for,
    model_state,
    register_canonicalizer,
)
from .groups._base import State

__all__ = ["align", "canonical_element", "canonicalize"]

Gauge = Literal["balanced", "unit_in"]


def _rescalings(group: GaugeGroup) -> list[RescalingFactor]:
    return [f for f in group.factors if isinstance(f, RescalingFactor)]


def _unit_in(group: GaugeGroup, state: State) -> Element:
    out, current = {}, dict(state)
    for f in _rescalings(group):
        n_in, _ = _scale_norms(f, current)
        if (n_in <= 0).any():
            k = int((n_in <= 0).nonzero()[0])
            raise GaugeError(f"factor {f.name!r}: unit {k} has zero incoming weights")
        a = (1 / n_in.sqrt()).to(next(iter(state.values())).dtype)
        out[f.name] = a
        current = f.apply(current, a)
    return out


def _sort_permutations(group: GaugeGroup, state: State) -> Element:
    out = {}
    for f in group.factors:
        if not isinstance(f, PermutationFactor):
            continue
        key2 = torch.zeros(f.n, dtype=torch.float64)
        key3 = torch.zeros(f.n, dtype=torch.float64)
        for t in f.terms:
            x = state[t.param].double().movedim(t.axis, 0)
            vals = x[t.entries.reshape(-1)].reshape(f.n, -1)
            key2 += (vals**2).sum(1)
            key3 += (vals**3).sum(1)
        # lexicographic: norm first, then the third moment for (measure-zero) ties
        order = sorted(range(f.n), key=lambda c: (-round(float(key2[c]), 10), -float(key3[c])))
        out[f.name] = torch.tensor(order)
    return out


def _matrix_coupled(group: GaugeGroup) -> list[RescalingFactor]:
    """Rescalings of parameters that a matrix factor (GL, attention) also transforms.

    Norms of those parameters change under the matrix factor, so balancing them would tie
    the rescaling's gauge to the matrix factor's (canonical forms would then depend on the
    point of the orbit). They are pinned from an anchor no matrix factor touches instead."""
    matrix = {
        p
        for f in group.continuous
        if not isinstance(f, (RescalingFactor, TranslationFactor))
        for p in f.params()
    }
    return [
        f
        for f in _rescalings(group)
        if any(isinstance(t, Scale) and t.param in matrix for t in f.terms)
    ]


def _unit_anchor(f: RescalingFactor, state: State) -> Tensor:
    """The scales making the anchor entries `±1`: the anchor is a term scaling a parameter
    no matrix factor touches with power 1, one entry per scale (a LayerNorm's `γ`, say)."""
    for t in f.terms:
        if not isinstance(t, Scale) or t.power != 1:
            continue
        idx = t.index.expand(state[t.param].shape).reshape(-1)
        if sorted(idx.tolist()) != list(range(f.n)):
            continue
        vals = state[t.param].reshape(-1).double()
        a = torch.empty(f.n, dtype=torch.float64)
        a[idx] = 1 / vals.abs()
        if not torch.isfinite(a).all():
            raise GaugeError(f"factor {f.name!r}: a zero entry of {t.param} cannot be scaled to 1")
        return a.to(state[t.param].dtype)
    raise GaugeError(
        f"factor {f.name!r} rescales parameters of a matrix factor and has no anchor term "
        "to fix its gauge from"
    )


def _canonical_shifts(group: GaugeGroup, state: State, passes: int = 4) -> tuple[Element, State]:
    """The shifts (translation factors with a `canonical` gauge) that bring `state` to every
    shift's gauge at once, and the shifted state.

    Shifts commute, but one shift's gauge condition can read what another moves (a
    LayerNorm shift changes the bias that a centering condition reads), so the gauges are
    imposed in turn, each on the state the previous ones left, until none moves (the
    dependencies run one way, so this takes a few passes)."""
    factors = [f for f in group.continuous if hasattr(f, "canonical")]
    total = {f.name: f.identity(next(iter(state.values())).dtype) for f in factors}
    shifted = dict(state)
    for _ in range(passes):
        moved = 0.0
        for f in factors:
            v = f.canonical(shifted)
            shifted = f.apply(shifted, v)
            total[f.name] = total[f.name] + v.to(total[f.name].dtype)
            scale = max(1.0, float(total[f.name].abs().max()))
            moved = max(moved, float(v.abs().max()) / scale)
        if moved <= 1e-13:
            break
    return total, shifted


def canonical_element(
    model: nn.Module,
    group: GaugeGroup | None = None,
    *,
    gauge: Gauge = "balanced",
    example_inputs: Any = None,
) -> Element:
    """The element `g` such that `group.act(model, g)` is the canonical representative."""
    group = symmetries(model, example_inputs) if group is None else group
    state = model_state(model)
    params = {n for n, _ in model.named_parameters()}
    # bias shifts first: the balanced norms depend on the biases they move
    shifts, shifted = _canonical_shifts(group, state)
    pinned = {f.name: _unit_anchor(f, shifted) for f in _matrix_coupled(group)}
    for name, a in pinned.items():
        shifted = group.factor(name).apply(shifted, a)
    rest = GaugeGroup(
        tuple(f for f in group.factors if f.name not in pinned), group.breakers, group.param_names
    )
    if gauge == "balanced":
        g = _balanced(rest, shifted, params)
    elif gauge == "unit_in":
        g = _unit_in(rest, shifted)
    else:
        raise GaugeError(f"unknown gauge {gauge!r}; use 'balanced' or 'unit_in'")
    g.update(pinned)
    # in the group's order (rescalings act first) a shift is rescaled, see `scaled_by`
    for name, v in shifts.items():
        g[name] = GaugeGroup._rescale_shift(group.factor(name), v, g, moved=False)
    current = group.act_state(state, g)
    for f in group.continuous:
        if isinstance(f, RescalingFactor) or f.name in shifts:
            continue
        fn = canonicalizer_for(f)
        if fn is None:
            continue
        g[f.name] = fn(f, current)
        current = f.apply(current, g[f.name])
    # the matrix factors were fixed after the shifts, but act before them in the group
    for name in shifts:
        g[name] = GaugeGroup._rescale_shift(group.factor(name), g[name], g, scaled=False)
    g.update(_sort_permutations(group, current))
    return g


def canonicalize(
    model: nn.Module,
    gauge: Gauge = "balanced",
    *,
    example_inputs: Any = None,
    group: GaugeGroup | None = None,
) -> nn.Module:
    """The canonical representative of `model`'s gauge orbit (a new model).

    **Arguments:**

    - `gauge`: `"balanced"` (minimal total squared norm: equal incoming and outgoing norms
      per unit) or `"unit_in"` (incoming norm 1 per unit).
    - `example_inputs`, `group`: passed to / instead of `symmetries`.
    """
    group = symmetries(model, example_inputs) if group is None else group
    return group.act(model, canonical_element(model, group, gauge=gauge))


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    example_inputs: Any = None,
    group: GaugeGroup | None = None,
    rtol: float = 1e-7,
) -> Element:
    """The element `g` with `act(model_a, g) == model_b`.

    Both models are brought to the canonical form; `g = g_a · g_b⁻¹`. Raises `GaugeError`
    with the residual when the canonical forms differ, i.e. the models are not
    gauge-equivalent (relative tolerance `rtol`).
    """
    group = symmetries(model_a, example_inputs) if group is None else group
    ga = canonical_element(model_a, group)
    gb = canonical_element(model_b, group)
    ca = group.act_state(model_state(model_a), ga)
    cb = group.act_state(model_state(model_b), gb)
    diff, top = 0.0, 1e-300
    for name, _ in model_a.named_parameters():
        a, b = ca[name].double(), cb[name].double()
        if a.shape != b.shape:
            raise GaugeError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        if a.numel():
            # relative to the largest weight: a parameter the gauge sets to zero (a bias
            # absorbed elsewhere) holds rounding noise that is no evidence of a difference
            diff, top = max(diff, float((a - b).abs().max())), max(top, float(b.abs().max()))
    residual = diff / top
    if residual > rtol:
        raise GaugeError(
            f"the models are not gauge-equivalent: canonical forms differ by {residual:.3e} "
            f"(relative, tolerance {rtol:.1e})"
        )
    return group.compose(ga, group.inverse(gb))


def _affine_identity_gauge(f: AffineFactor, state: State) -> Tensor:
    """Linear networks: the gauge making the layer before each interior state the identity
    with zero bias (`G_n = w̄_{n-1}`, `c_n = b̄_{n-1}` after the earlier layers are fixed)."""
    left = next(t for t in f.terms if t.side == "left")
    w = state[left.weight]
    b = state[left.bias] if left.bias else torch.zeros(f.d, dtype=w.dtype)
    if w.shape != (f.d, f.d):
        raise GaugeError(f"factor {f.name!r}: the identity gauge needs a square layer before it")
    g = torch.eye(f.d + 1, dtype=w.dtype)
    g[: f.d, : f.d] = w
    g[: f.d, f.d] = b
    return g


register_canonicalizer(AffineFactor, _affine_identity_gauge)
