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

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._balance import balanced_scales as _balanced
from ._balance import scale_norms as _scale_norms
from ._errors import GaugeError
from ._invariance import exact_invariance_error, invariance_error
from ._tolerances import drift_tolerance, model_dtype, weight_tolerance
from .discovery import symmetries
from .groups import (
    AffineFactor,
    BatchNormShift,
    Element,
    FreeFactor,
    GaugeGroup,
    MonomialScaleFactor,
    PermutationFactor,
    RescalingFactor,
    Scale,
    TranslationFactor,
    canonicalizer_for,
    load_state,
    model_state,
    register_canonicalizer,
)
from .groups._base import State
from .groups._offset import LayerNormOffsetFactor
from .groups._orthogonal import OrthogonalFactor, RotateRows
from .io import sample_inputs

__all__ = ["align", "canonical_element", "canonicalize", "unfixed_factors"]

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
    """Each permutation sorting its items by decreasing norm, computed on the state the
    permutations acting before it left (the query heads of a key-value group are sorted
    where the group's own permutation put them)."""
    out = {}
    for f in group.discrete:
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
        state = f.apply(state, out[f.name])
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
        and not getattr(f, "canonical_first", False)
        for p in f.params()
    }
    return [
        f
        for f in _rescalings(group)
        if any(isinstance(t, Scale) and t.param in matrix for t in f.terms)
    ]


def _norm_kept(group: GaugeGroup) -> dict[str, int]:
    """`{param: axis}` for parameters that matrix factors only rotate, along `axis`: the
    norms of their slices along that axis (rows' columns, say) are the same at every point
    of the orbit. Only orthogonal factors mixing rows (`RotateRows`) qualify."""
    axes: dict[str, set] = {}
    for f in group.continuous:
        if isinstance(f, (RescalingFactor, TranslationFactor)):
            continue
        for t in getattr(f, "terms", ()):
            param = getattr(t, "param", None)
            if param is None:
                continue  # e.g. an affine term: its parameters are marked below
            axis = 0 if isinstance(f, OrthogonalFactor) and isinstance(t, RotateRows) else None
            axes.setdefault(param, set()).add(axis)
        for p in f.params():
            axes.setdefault(p, {None})
    return {p: next(iter(a)) for p, a in axes.items() if a == {0}}


def _unit_norm(f: RescalingFactor, state: State, kept: dict[str, int]) -> Tensor | None:
    """Scales giving unit norm to the slices of a term whose parameter matrix factors only
    rotate along those slices (a writer's columns under a residual-stream rotation)."""
    for t in f.terms:
        if not isinstance(t, Scale) or kept.get(t.param) != 0 or t.power not in (1, -1):
            continue
        w = state[t.param]
        if w.ndim != 2 or t.index.ndim != 2 or t.index.shape[0] != 1:
            continue  # one scale per column of a matrix, nothing else
        idx = t.index.expand(w.shape)[0]
        if sorted(idx.tolist()) != list(range(f.n)):
            continue
        norms = torch.linalg.vector_norm(w.double(), dim=0)
        if not bool((norms > 0).all()):
            raise GaugeError(f"factor {f.name!r}: a zero column of {t.param} cannot be normalized")
        a = torch.empty(f.n, dtype=torch.float64)
        a[idx] = norms ** (-1.0 / t.power)
        return a.to(w.dtype)
    return None


def _unit_anchor(f: RescalingFactor, state: State, kept: dict[str, int] | None = None) -> Tensor:
    """The scales making the anchor entries `±1`: the anchor is a term scaling a parameter
    no matrix factor touches with power 1, one entry per scale (a LayerNorm's `γ`, say).
    Failing that, the columns of a parameter that matrix factors only rotate get unit norm;
    failing that, an eval BatchNorm's `γ` absorbing the scales (which a linear stream's
    `GL` reads but keeps) is made `±1`."""
    for t in f.terms:
        if not isinstance(t, Scale) or t.power != 1:
            continue
        idx = t.index.expand(state[t.param].shape).reshape(-1)
        if sorted(idx.tolist()) != list(range(f.n)):
            continue
        vals = t.value(state[t.param]).reshape(-1).double()  # an offset gain: `w + c`
        a = torch.empty(f.n, dtype=torch.float64)
        a[idx] = 1 / vals.abs()
        if not torch.isfinite(a).all():
            raise GaugeError(f"factor {f.name!r}: a zero entry of {t.param} cannot be scaled to 1")
        return a.to(state[t.param].dtype)
    a = _unit_norm(f, state, kept or {})
    if a is not None:
        return a
    for t in f.terms:  # BatchNorm's `γ ↦ γ / α` (no matrix factor writes `γ`)
        if not isinstance(t, BatchNormShift) or sorted(t.index.tolist()) != list(range(f.n)):
            continue
        vals = state[t.weight].double()
        a = torch.empty(f.n, dtype=torch.float64)
        a[t.index] = vals.abs()
        if not (a > 0).all():
            raise GaugeError(f"factor {f.name!r}: a zero entry of {t.weight} cannot be scaled to 1")
        return a.to(state[t.weight].dtype)
    raise GaugeError(
        f"factor {f.name!r} rescales parameters of a matrix factor and has no anchor term "
        "to fix its gauge from"
    )


def _canonical_shifts(group: GaugeGroup, state: State, passes: int = 200) -> tuple[Element, State]:
    """The shifts (translation factors with a `canonical` gauge) that bring `state` to every
    shift's gauge at once, and the shifted state.

    Shifts commute, but one shift's gauge condition can read what another moves (a
    LayerNorm shift changes the bias that a centering condition reads), so the gauges are
    imposed in turn, each on the state the previous ones left, until none moves. Where the
    dependencies run one way this takes a few passes; where two conditions read each
    other's entries (a table's columns centered over all rows, one of them an unread row
    that the free factor zeroes) the passes converge geometrically, to the one state
    meeting both. Raises `GaugeError` when they have not converged after `passes`."""
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
            return total, shifted
    raise GaugeError(
        f"the shift gauges did not converge in {passes} passes (last move {moved:.1e}): "
        "no canonical form for the shifts of this model"
    )


def unfixed_factors(group: GaugeGroup) -> list[str]:
    """The names of the continuous factors of `group` that have no canonical form (no
    `canonical` gauge, no registered canonicalizer, not a rescaling): `canonical_element`
    leaves them at the identity, so the "canonical" form is then one point of the orbit
    per point of those factors' orbits, not one per orbit (a linear stream's `GL`)."""
    return [
        f.name
        for f in group.continuous
        if not isinstance(f, RescalingFactor)
        and not hasattr(f, "canonical")
        and canonicalizer_for(f) is None
    ]


def _float64(state: State) -> State:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def _matrix_order(f: Any) -> int:
    """Stream rotations, then LayerNorm offsets, then the other matrix factors."""
    if isinstance(f, OrthogonalFactor) or getattr(f, "canonical_first", False):
        return 0
    return 1 if isinstance(f, LayerNormOffsetFactor) else 2


def _element(group: GaugeGroup, state: State, params: set[str], gauge: Gauge) -> Element:
    """The canonicalizing element of `state` (computed in `state`'s dtype)."""
    g, shifts = _scales_and_shifts(group, state, params, gauge)
    g = _joint_scales_and_shifts(group, state, params, gauge, g)
    return _matrices_and_permutations(group, state, g, shifts)


def _joint_scales_and_shifts(
    group: GaugeGroup, state: State, params: set[str], gauge: Gauge, g: Element, rounds: int = 50
) -> Element:
    """`g` (rescalings and shifts) refined until the shift gauges hold after the rescalings
    too. They do at once where a zeroed bias stays zero under the rescalings; an eval
    BatchNorm's `β` does not (`β ↦ β + (γμ/s)(1/α − 1)`), so a shift gauge on it and the
    balanced scales are imposed in turn until neither moves. Raises `GaugeError` when they
    do not meet within `rounds`."""
    top = max(
        (float(v.abs().max()) for v in state.values() if v.is_floating_point() and v.numel()),
        default=1.0,
    )
    for _ in range(rounds):
        current = group.act_state(state, g, validate=False)
        extra, _ = _canonical_shifts(group, current)
        if all(float(v.abs().max()) <= 1e-12 * max(1.0, top) for v in extra.values() if v.numel()):
            return g
        h, _ = _scales_and_shifts(group, current, params, gauge)
        g = group.compose(g, h)
    raise GaugeError(
        f"the shift gauges and the {gauge!r} rescalings did not meet in {rounds} rounds: no "
        "canonical form for this model's rescalings and shifts"
    )


def _scales_and_shifts(
    group: GaugeGroup, state: State, params: set[str], gauge: Gauge
) -> tuple[Element, Element]:
    """The rescalings and shifts of the canonical element (the shifts' gauges imposed
    first, in pre-rescaling coordinates), and the shifts alone."""
    # bias shifts first: the balanced norms depend on the biases they move
    shifts, shifted = _canonical_shifts(group, state)
    # matrix factors whose canonical form reads nothing a rescaling moves (a stream's `GL`,
    # from its table) are fixed first: the rescalings they share parameters with are then
    # balanced at the same point whatever the point of the orbit
    for f in group.continuous:
        fn = canonicalizer_for(f) if getattr(f, "canonical_first", False) else None
        if fn is not None:
            shifted = f.apply(shifted, fn(f, shifted))
    kept = _norm_kept(group)
    pinned = {f.name: _unit_anchor(f, shifted, kept) for f in _matrix_coupled(group)}
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
    # in the group's order (rescalings act first) a shift is rescaled, see `scaled_by`; the
    # monomial scales (gated units) are fixed below, the identity until then
    dtype = next(iter(state.values())).dtype
    for name, v in shifts.items():
        partial = {f.name: f.identity(dtype) for f in group.continuous} | g
        g[name] = group._rescale_shift(group.factor(name), v, partial, moved=False)
    return g, shifts


def _matrices_and_permutations(
    group: GaugeGroup, state: State, g: Element, shifts: Element
) -> Element:
    """`g` (rescalings and shifts) completed by the matrix factors' canonical forms and the
    sorting permutations."""
    current = group.act_state(state, g, validate=False)
    # stream rotations first: their gauge reads only the embedding table, while they mix
    # the columns that the head factors' balanced forms read (and commute with those, which
    # act on rows), so this order makes the head gauges orbit-independent too; then the
    # LayerNorm offsets (their gauge `β̃ = ±1` reads only the LayerNorm, which rotations
    # keep): they turn the readers' rows on the right, which the head factors' forms read
    ordered = sorted(group.continuous, key=_matrix_order)
    for f in ordered:
        if isinstance(f, RescalingFactor) or f.name in shifts:
            continue
        fn = canonicalizer_for(f)
        if fn is None:  # no canonical form (`unfixed_factors`): left where it is
            g[f.name] = f.identity(next(iter(current.values())).dtype)
            continue
        g[f.name] = fn(f, current)
        current = f.apply(current, g[f.name])
    # the monomial scales (gated units) were fixed in the loop, acting after the shifts
    # there, but act before them in the group: each shift rescaled by them alone
    dtype = next(iter(state.values())).dtype
    monomials = {f.name: f.identity(dtype) for f in group.continuous} | {
        f.name: g[f.name] for f in group.continuous if isinstance(f, MonomialScaleFactor)
    }
    for name in shifts:
        g[name] = group._rescale_shift(group.factor(name), g[name], monomials, moved=False)
    # the matrix factors were fixed after the shifts, but act before them in the group
    for name in shifts:
        g[name] = group._rescale_shift(group.factor(name), g[name], g, scaled=False)
    g.update(_sort_permutations(group, current))
    return _free_last(group, state, g)


def _free_last(group: GaugeGroup, state: State, g: Element) -> Element:
    """`g` with each free factor's element taken from the entries that every factor
    acting before it left: its entries then come out exactly zero (`x + (−x)`), which the
    shift passes above leave to rounding where another shift also moves those rows (a
    vector moved between two tables moves their unread rows too)."""
    order = group.continuous
    for i, f in enumerate(order):
        if not isinstance(f, FreeFactor):
            continue
        after = {p for h in order[i + 1 :] for p in h.params()}
        if after & set(f.params()):
            continue  # a later factor moves these entries again: no exact zero to keep
        dtype = g[f.name].dtype
        before = group.act_state(state, {**g, f.name: f.identity(dtype)}, validate=False)
        g[f.name] = f.canonical(before).to(dtype)
    return g


def canonical_element(
    model: nn.Module,
    group: GaugeGroup | None = None,
    *,
    gauge: Gauge = "balanced",
    example_inputs: Any = None,
) -> Element:
    """The element `g` such that `group.act(model, g)` is the canonical representative.

    It is computed in float64 whatever the model's dtype (the canonical scales of a deep
    network span many orders of magnitude), and returned in the model's floating dtype.
    """
    group = symmetries(model, example_inputs) if group is None else group
    group.check_model(model)
    params = {n for n, _ in model.named_parameters()}
    g = _element(group, _float64(model_state(model)), params, gauge)
    dtype = model_dtype(model)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in g.items()}


def _with_state(model: nn.Module, state: State, names: set[str], dtype: torch.dtype | None):
    """A copy of `model` holding `state[name]` for `names` (cast to `dtype`, or to each
    tensor's own dtype)."""
    out = copy.deepcopy(model)
    if dtype is not None:
        out = out.to(dtype)
    own = model_state(out)
    load_state(out, {k: state[k].to(own[k].dtype) for k in names if k in state})
    return out


def _check_inputs(model: nn.Module, group: GaugeGroup, example_inputs: Any) -> Any:
    """The inputs to check a transformed model on: those given, else those the group was
    found with, else sample inputs (`gaugenet.io.sample_inputs`: from the model's
    `example_inputs`, token ids for Hugging Face models, or its first layer)."""
    if example_inputs is not None:
        return example_inputs
    if group.example_inputs is not None:
        return group.example_inputs
    try:
        return sample_inputs(model, 4)
    except GaugeError as exc:
        raise GaugeError(
            f"pass example_inputs: the canonical form of {type(model).__name__} is checked on "
            f"them, and they cannot be inferred ({exc})"
        ) from None


def _scale_span(group: GaugeGroup, g: Element) -> str:
    scales = [g[f.name].abs() for f in _rescalings(group) if f.name in g and g[f.name].numel()]
    if not scales:
        return "its gauge elements"
    flat = torch.cat([s.reshape(-1) for s in scales])
    return f"its canonical scales span {float(flat.min()):.1e} to {float(flat.max()):.1e}"


def canonicalize(
    model: nn.Module,
    gauge: Gauge = "balanced",
    *,
    example_inputs: Any = None,
    group: GaugeGroup | None = None,
    tol: float | None = None,
) -> nn.Module:
    """The canonical representative of `model`'s gauge orbit (a new model), checked.

    The canonical element is computed and applied in float64; the result is verified on
    `example_inputs` (in float64), cast back to the model's dtype and verified again.

    **Arguments:**

    - `gauge`: `"balanced"` (minimal total squared norm: equal incoming and outgoing norms
      per unit) or `"unit_in"` (incoming norm 1 per unit).
    - `example_inputs`, `group`: passed to / instead of `symmetries`; the inputs are also
      those the outputs are checked on (inferred for models starting with `nn.Linear`).
    - `tol`: the largest allowed relative output change; default by the weights' dtype
      (`gaugenet._tolerances.DRIFT_TOLERANCES`: 1e-9 for float64, 1e-5 for float32).

    Factors without a canonical form (`unfixed_factors(group)`, e.g. a linear stream's
    `GL`) are left where they are: the result is then canonical only up to them.

    **Returns:** the new model, in `model`'s dtype. Raises `GaugeError` when its outputs
    moved by more than `tol`: in float64 (a factor is no symmetry of this model), or only
    after the cast (the model's dtype cannot hold the canonical weights; the message says
    so and names the ways out).
    """
    group = symmetries(model, example_inputs) if group is None else group
    group.check_model(model)
    inputs = _check_inputs(model, group, example_inputs)
    dtype = model_dtype(model)
    tol = drift_tolerance(dtype) if tol is None else tol
    state = _float64(model_state(model))
    g = _element(group, state, {n for n, _ in model.named_parameters()}, gauge)
    new_state = group.act_state(state, g)
    touched = group._touched()
    exact = _with_state(model, new_state, touched, torch.float64)
    # float64 throughout (casts down kept): float32 rounding inside a model is not a drift
    drift64 = drift = exact_invariance_error(model, exact, inputs)
    if not drift <= tol:
        raise GaugeError(
            f"the {gauge!r} canonical form of {type(model).__name__} changes its outputs by "
            f"{drift:.2e} even in float64 (tolerance {tol:.0e}; {_scale_span(group, g)}): "
            "a gauge factor does not hold for this model, or the canonical form is too "
            "ill-conditioned; try gauge='balanced'"
        )
    if dtype == torch.float64:
        return exact
    new = _with_state(model, new_state, touched, None)
    drift = invariance_error(model, new, inputs)
    if not drift <= tol:
        raise GaugeError(
            f"the {gauge!r} canonical form of this {dtype} model holds in float64 (drift "
            f"{drift64:.1e}) but {dtype} cannot hold it: {_scale_span(group, g)}, and cast "
            f"back to {dtype} it changes the outputs by {drift:.2e} (tolerance {tol:.0e}); use "
            "gauge='balanced', or convert the model to float64 first (model.double(), with "
            f"tol={tol:.0e} for the precision its weights came with; CLI: --float64)"
        )
    return new


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    example_inputs: Any = None,
    group: GaugeGroup | None = None,
    rtol: float | None = None,
) -> Element:
    """The element `g` with `act(model_a, g) == model_b`.

    Both models are brought to the canonical form (computed in float64); `g = g_a · g_b⁻¹`.
    Raises `GaugeError` with the residual when the canonical forms differ, i.e. the models
    are not gauge-equivalent; where factors have no canonical form (`unfixed_factors`) the
    forms may differ along them too, and the error names them instead. Relative tolerance
    `rtol`, by default following the least precise dtype of the two
    (`gaugenet._tolerances.WEIGHT_TOLERANCES`: 1e-7 for float64, 1e-4 for float32, whose
    weights carry rounding errors of 6e-8 each).
    """
    group = symmetries(model_a, example_inputs) if group is None else group
    group.check_model(model_a)
    group.check_model(model_b)
    if rtol is None:
        dtype = max(model_dtype(model_a), model_dtype(model_b), key=lambda d: torch.finfo(d).eps)
        rtol = weight_tolerance(dtype)
    params = {n for n, _ in model_a.named_parameters()}
    sa, sb = _float64(model_state(model_a)), _float64(model_state(model_b))
    ga, gb = _element(group, sa, params, "balanced"), _element(group, sb, params, "balanced")
    ca, cb = group.act_state(sa, ga), group.act_state(sb, gb)
    diff, top = 0.0, 1e-300
    for name, _ in model_a.named_parameters():
        a, b = ca[name], cb[name]
        if a.shape != b.shape:
            raise GaugeError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        if a.numel():
            # relative to the largest weight: a parameter the gauge sets to zero (a bias
            # absorbed elsewhere) holds rounding noise that is no evidence of a difference
            diff, top = max(diff, float((a - b).abs().max())), max(top, float(b.abs().max()))
    residual = diff / top
    unfixed = unfixed_factors(group)
    if not residual <= rtol and unfixed:
        raise GaugeError(
            f"cannot decide whether the models are gauge-equivalent: their canonical forms "
            f"differ by {residual:.3e} (relative, tolerance {rtol:.1e}), but these factors "
            f"have no canonical form and were left where they are: {', '.join(unfixed)}"
        )
    if not residual <= rtol:
        raise GaugeError(
            f"the models are not gauge-equivalent: canonical forms differ by {residual:.3e} "
            f"(relative, tolerance {rtol:.1e})"
        )
    dtype = model_dtype(model_a)
    g = group.compose(ga, group.inverse(gb))
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in g.items()}


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
