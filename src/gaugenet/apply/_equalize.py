"""Data-free equalization: the gauge element under which the weights survive rounding best."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from .._invariance import cast_floats, exact_invariance_error
from .._tolerances import drift_tolerance, model_dtype
from ..discovery import symmetries
from ..groups import Element, GaugeGroup, GLFactor, OrthogonalFactor, RescalingFactor, model_state
from ..groups._base import State
from ..groups._orthogonal import (
    ConjugatedColumns,
    ConjugatedRows,
    RotateBlock,
    RotateColumns,
    RotateRows,
)
from ._activation_aware import activation_aware_search
from ._distance import OutputDistance, squared_error
from ._learn import learn_element
from ._online import online_layers, rotatable_layers, rotate_inputs_online
from ._quantize import GRANULARITIES, quantize_tensor, quantized_params, transposed_params
from ._ranges import balance, factor_ranges
from ._schemes import QuantScheme, round_weight, with_activation_rounding
from ._search import (
    forward_fn,
    input_means,
    input_ranges,
    local_search,
    noise_model_scales,
    sensitivities,
    smoothing_scales,
)
from ._select import Candidate, select_simplest

__all__ = ["equalize", "equalizing_element", "weight_quantization_error"]

OBJECTIVES = ("range", "output")
# SmoothQuant migration strengths tried as candidates when validation inputs choose
SMOOTHING = (0.25, 0.5, 0.75)


def weight_quantization_error(
    state: State,
    names: list[str],
    bits: int,
    granularity: str = "per-tensor",
    transposed: set[str] | frozenset[str] = frozenset(),
) -> float:
    """`Σ_P mean_o ‖Q(P)_o − P_o‖² / ‖P_o‖²` over the named tensors, `o` their output rows
    (columns for the names in `transposed`, weights stored `(in, out)`): the relative
    rounding noise of each output channel. (A norm over the whole tensor would be dominated
    by its largest rows and blind to small channels rounded away.)"""
    total = 0.0
    for name in names:
        p = state[name].double()
        p = p.transpose(0, 1) if name in transposed else p
        p = p.reshape(p.shape[0], -1) if p.dim() > 1 else p.reshape(-1, 1)
        err = ((quantize_tensor(p, bits, granularity) - p) ** 2).sum(1)
        norm = (p**2).sum(1)
        live = norm > 0
        if live.any():
            total += float((err[live] / norm[live]).mean())
    return total


def _hadamard(d: int) -> Tensor | None:
    if d < 2 or d & (d - 1):
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def _rounded_outputs(
    model: nn.Module,
    inputs: Any,
    names: list[str],
    scheme: QuantScheme,
    online: Collection[str] = (),
) -> tuple[Callable[[State], Tensor], Tensor]:
    """`(state ↦ y_q, y)`: the outputs of `model` with `state`'s weights rounded as `scheme`
    rounds them (and, with its `act_bits`, every Linear/Conv input rounded per token), and
    the float model's outputs `y`, on `inputs`. The Linear layers named in `online` are
    rounded as their online rotation deploys them (`round_weight(..., rotated=True)`)."""
    act_bits = scheme.act_bits
    dtype = next(p.dtype for p in model.parameters())
    with torch.no_grad():
        y = forward_fn(model, inputs)(model_state(model))
    noisy = (
        with_activation_rounding(model, act_bits, copy_model=True, online=online)
        if act_bits
        else model
    )
    run = forward_fn(noisy, inputs, prefer=names)  # a tied weight rounded under all names
    transposed = transposed_params(model)
    rotated = {f"{n}.weight" for n in online}

    def rounded(state: State) -> Tensor:
        st = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        st.update({n: round_weight(st[n], scheme, n in transposed, n in rotated) for n in names})
        with torch.no_grad():
            return run(st)

    return rounded, y


def _output_noise(
    model: nn.Module,
    inputs: Any,
    names: list[str],
    scheme: QuantScheme,
    distance: OutputDistance = squared_error,
    online: Collection[str] = (),
) -> Callable[[State], float]:
    """`state ↦ distance(y_q, y)` (default `Σ (y_q − y)²`): the output noise of `model` with
    `state`'s weights rounded as `scheme` rounds them (`_rounded_outputs`), on `inputs` (the
    example inputs; the score that picks among candidates)."""
    rounded, y = _rounded_outputs(model, inputs, names, scheme, online)

    def noise(state: State) -> float:
        return float(distance(rounded(state), y))

    return noise


def _step(
    f: RescalingFactor | GLFactor,
    state: State,
    q: set[str],
    per_channel: bool,
    normalize: bool,
    transposed: set[str] | frozenset[str] = frozenset(),
) -> Tensor:
    alpha = balance(*factor_ranges(f, state, q, per_channel, normalize, transposed))
    if isinstance(f, RescalingFactor):
        return alpha
    return torch.diag_embed(alpha.reshape(f.b, f.d))


def equalizing_element(
    model: nn.Module,
    example_inputs: Any,
    *,
    bits: int,
    granularity: str = "per-tensor",
    objective: str = "range",
    sweeps: int = 20,
    rotations: bool = True,
    group: GaugeGroup | None = None,
    search: int = 300,
    act_bits: int | None = None,
    scheme: QuantScheme | str | None = None,
    learn: int = 0,
    learn_scales: bool = False,
    distance: OutputDistance = squared_error,
    validation: Any = None,
    validation_distance: OutputDistance | None = None,
    log: Callable[[str], None] | None = None,
    online: Collection[str] = (),
) -> tuple[GaugeGroup, Element]:
    """The element of `model`'s gauge group that `equalize` applies.

    Each sweep sets every rescaling factor (and the diagonal of every GL factor) to its
    closed-form range balance given the others; factors that share a tensor are coupled,
    hence the sweeps (two sequences: ranges relative to each tensor's quantization range,
    and absolute ranges). A step is kept only where it lowers the objective: the
    `weight_quantization_error` (`objective="range"`, data-free) or the output change that
    rounding the weights causes on `example_inputs` (`objective="output"`); the better
    sequence wins. With `rotations`, each GL factor whose block size
    is a power of two then tries the normalized Hadamard rotation, kept where it lowers the
    error further (it spreads outlier entries over the block).

    With `objective="output"` data-driven candidates join the closed-form sweeps (see
    `_search`): the minimizer of a first-order model of the rounding noise, weighted by each
    weight's output sensitivity on `example_inputs`, with `act_bits` also SmoothQuant's
    balance of input and weight ranges, and then `search` steps of a local search on the
    realized output noise. Range balancing treats every channel as equally
    important; these do not. Every candidate is kept only where it lowers the objective, so
    the result is never worse than the input on it.

    With `scheme` (a `QuantScheme` or its string, e.g. `"w4g128"`, `"w4a8"`), the output
    objective rounds exactly as that scheme does (per group included) and `bits`,
    `granularity` and `act_bits` are taken from it; the closed-form steps treat per-group
    weights as per-channel.

    With `learn` (steps; `objective="output"` only), the orthogonal factors (and with
    `learn_scales` the rescaling factors too) are then learned on the group's manifold from
    the best element so far, against the rounded model's output error with a
    straight-through estimator (`_learn.learn_element`, as SpinQuant learns its rotation);
    the learned element is kept only where it lowers the objective.

    With `online` (names of Linear layers; `objective="output"` only), those layers are
    rounded everywhere as their online input rotation deploys them (`_online`): the element
    is chosen for the model that `rotate_inputs_online` then builds.

    With `validation` (inputs other than `example_inputs`, e.g. held back from the
    calibration split; `objective="output"` only), the element is then chosen on them
    (`_select.select_simplest`) among the identity, the data-light candidates (range
    balance, SmoothQuant's balance at each strength of `SMOOTHING`, AWQ's activation-aware
    scales, the noise model) and the element after each of search, rotations and learning,
    by `validation_distance` (default `distance`) on the rounded model's outputs: the
    calibration objective overfits a few inputs, so of the candidates no worse than plain
    rounding on the validation inputs, the first in that order whose score is within one
    standard error of the lowest is taken. `log` receives one line with every candidate's
    validation score, the choice and why.

    **Returns:** `(group, element)`.
    """
    if scheme is not None:
        scheme = QuantScheme.of(scheme)
        bits, act_bits = scheme.weight_bits, scheme.act_bits
        granularity = "per-tensor" if scheme.granularity == "per-tensor" else "per-channel"
    if objective not in OBJECTIVES:
        raise GaugeError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if learn and objective != "output":
        raise GaugeError("learn needs objective='output': the loss is the rounded output error")
    if act_bits is not None and objective != "output":
        raise GaugeError("act_bits needs objective='output': activations come from the data")
    if validation is not None and objective != "output":
        raise GaugeError("validation needs objective='output': it scores the rounded outputs")
    if granularity not in GRANULARITIES:
        raise GaugeError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if online and objective != "output":
        raise GaugeError(_ONLINE_NEEDS_OUTPUT)
    group = symmetries(model, example_inputs) if group is None else group
    names, transposed = quantized_params(model), transposed_params(model)
    q, per_channel = set(names), granularity == "per-channel"
    factors = [f for f in group.factors if isinstance(f, (RescalingFactor, GLFactor))]
    start = _double_state(model)
    identity = {f.name: f.identity(torch.float64) for f in factors}

    if objective == "range":

        def err(s: State) -> float:
            return weight_quantization_error(s, names, bits, granularity, transposed)

    else:
        sch = _aimed(scheme, bits, granularity, act_bits)
        err = _output_noise(model, example_inputs, names, sch, distance, online)
        for_learning = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
        if learn_scales:
            for_learning += [f for f in group.factors if isinstance(f, RescalingFactor)]

    best = (err(start), identity, start)
    pool = [Candidate("identity", identity, start)]  # what validation chooses among
    # two sequences of sweeps: ranges relative to each tensor's quantization range, and the
    # classic absolute ranges; their fixed points differ when several tensors share a factor.
    # A factor's closed-form step is taken only where it lowers the objective, so a factor
    # whose balance hurts elsewhere (a wide dense layer after a conv, say) is left alone.
    for normalize in (True, False):
        state, elem, e = start, dict(identity), best[0]
        for _ in range(sweeps):
            improved = False
            for f in factors:
                a = _step(f, state, q, per_channel, normalize, transposed)
                trial = f.apply(state, a)
                e_trial = err(trial)
                if e_trial < e * (1 - 1e-9):
                    state, e, improved = trial, e_trial, True
                    elem[f.name] = f.compose(elem[f.name], a)
            if not improved:
                break
        if e < best[0]:
            best = (e, dict(elem), state)
    if best[2] is not start:
        pool.append(Candidate("range balance", best[1], best[2]))
    if objective == "output":
        strengths = SMOOTHING if validation is not None else (0.5,) if act_bits else ()
        best, closed = _data_driven(
            model,
            example_inputs,
            factors,
            names,
            start,
            best,
            err,
            bits,
            per_channel,
            search,
            strengths=strengths,
            group_size=sch.group_size,
        )
        pool += closed
    e_best, elem, state = best
    pool.append(Candidate("searched", dict(elem), state))
    for f in factors if rotations else ():
        h = _hadamard(f.d) if isinstance(f, GLFactor) else None
        if h is None:
            continue
        h = h.expand(f.b, f.d, f.d)
        trial = f.apply(state, h)
        e = err(trial)
        if e < e_best:
            e_best, state, elem[f.name] = e, trial, f.compose(elem[f.name], h)
    # orthogonal factors (a residual stream's O(d)): the Hadamard rotation and a randomized
    # one (random signs, as QuaRot), each kept only where it lowers the objective
    g = torch.Generator().manual_seed(0)
    for f in group.factors if rotations else ():
        h = _hadamard(f.d) if isinstance(f, OrthogonalFactor) else None
        if h is None:
            continue
        signs = torch.randint(0, 2, (f.d,), generator=g).to(h.dtype) * 2 - 1
        cur = elem.get(f.name, f.identity(torch.float64))
        candidates = (h, signs[:, None] * h)
        if f.fixes_ones:
            # `H diag(s) H` with `s₀ = 1` keeps `1` (`H` symmetric, its first column `1/√d`)
            # and spreads every feature over the others: two random sign patterns
            pats = torch.randint(0, 2, (2, f.d), generator=g).to(h.dtype) * 2 - 1
            pats[:, 0] = 1
            candidates = tuple(h @ (p[:, None] * h) for p in pats)
        for q in candidates:
            # through the group's own action, in its order of factors: a rotation need not
            # commute with the rescalings already chosen, and `equalize` applies `act`
            cand = {**elem, f.name: f.compose(cur, q)}
            trial = group.act_state(start, cand, validate=False)
            e = err(trial)
            if e < e_best:
                e_best, state, elem = e, trial, cand
    if state is not pool[-1].state:
        pool.append(Candidate("rotated", dict(elem), state))
    if learn:
        base = {f.name: elem.get(f.name, f.identity(torch.float64)) for f in group.continuous}
        cand, _ = learn_element(
            group, model, example_inputs, start, base, for_learning, names, sch,
            steps=learn, distance=distance, online=online,
        )  # fmt: skip
        trial = group.act_state(start, cand, validate=False)
        e = err(trial)
        if e < e_best:  # the guard: learned through a surrogate, kept on the objective
            e_best, state, elem = e, trial, cand
            pool.append(Candidate("learned", dict(elem), state))
    if validation is not None:
        rounded, y_val = _rounded_outputs(model, validation, names, sch, online)
        chosen, scores, why = select_simplest(
            pool[0], pool[1:], lambda c: rounded(c.state), y_val, validation_distance or distance
        )
        if log is not None:
            parts = ", ".join(f"{k} {v:.6g}" for k, v in scores.items())
            log(f"validation: {parts}; chose {chosen.label} ({why})")
        elem = chosen.element
    return group, elem


def equalize(
    model: nn.Module,
    example_inputs: Any,
    *,
    bits: int,
    granularity: str = "per-tensor",
    objective: str = "range",
    sweeps: int = 20,
    rotations: bool = True,
    group: GaugeGroup | None = None,
    tol: float | None = None,
    search: int = 300,
    act_bits: int | None = None,
    scheme: QuantScheme | str | None = None,
    learn: int = 0,
    learn_scales: bool = False,
    distance: OutputDistance = squared_error,
    validation: Any = None,
    validation_distance: OutputDistance | None = None,
    log: Callable[[str], None] | None = None,
    online: bool = False,
) -> nn.Module:
    """A copy of `model`, moved within its gauge group to where round-to-nearest weight
    quantization loses least; it computes the same function.

    Every rescaling factor that `gaugenet.symmetries` finds is balanced in closed form
    (`sqrt(r_down / r_up)` per channel, on ranges normalized by each tensor's quantization
    range); GL factors (attention heads) get their diagonal balanced and, optionally, a
    Hadamard rotation (see `equalizing_element`).

    **Arguments:**

    - `model`: the float model (not modified).
    - `example_inputs`: inputs to trace with and to check the function on.
    - `bits`, `granularity`: the quantizer aimed at (`"per-tensor"` or `"per-channel"`).
    - `objective`: how the closed-form candidates are ranked: `"range"` (data-free, by
      `weight_quantization_error`) or `"output"` (output noise on `example_inputs`).
    - `sweeps`: coordinate sweeps over coupled factors.
    - `group`: the gauge group, when already known.
    - `search`: with `objective="output"`, the number of local-search steps on the realized
      output noise (0: none).
    - `act_bits`: with `objective="output"`, aim at weight-and-activation quantization: the
      objective rounds every Linear/Conv input per token too (W8A8: `bits=8, act_bits=8`), so
      the search trades weight ranges against activation ranges, as smoothing does.
    - `scheme`: the full quantization scheme aimed at (`"w4g128"`, `"w4a8"`, ...), instead
      of `bits`, `granularity` and `act_bits`; the output objective rounds as it does.
    - `learn`: with `objective="output"`, steps of learning the orthogonal factors (with
      `learn_scales`, the rescalings too) on the group's manifold against the rounded
      model's output error (0: none). All of the element is merged into the weights: no
      rotation stays online.
    - `distance`: with `objective="output"`, how the rounded outputs are compared with the
      float ones (`(y_q, y) ↦` scalar): `squared_error` (default) or e.g. `logit_kl` for a
      model whose outputs are logits.
    - `validation`, `validation_distance`: with `objective="output"`, inputs other than
      `example_inputs` on which the element is chosen among the candidates, the identity
      included (so never worse than plain rounding there), by `validation_distance`
      (default `distance`; one that sums over rows, so that the one-standard-error rule
      can use folds of the rows); `log` receives the candidates' scores and the choice.
    - `online`: with `objective="output"`, also rotate the inputs of Linear layers online,
      the rotation applied at run time (QuaRot's `R4` before a down projection, found
      without names). Not a gauge transformation: the returned model has a different
      structure (those layers become `RotatedInput`), it costs an `O(n log n)` transform per
      token and layer. Proposed are the layers whose rounding error a fixed Hadamard-type
      rotation cuts at least in half (`online_layers`, measured on `example_inputs`), kept
      for a second search only where together they lower the objective at the identity on
      `example_inputs` (and on `validation`, when given). Then the finalists are judged on
      `validation` when given, else on `example_inputs` (`_online_element`): the
      weights-only element (`online=False`) without rotations, and each searched element
      with the proposed layers, with the unreached ones (whose input no orthogonal factor
      of the group rotates) and with every rotatable Linear layer, chosen by the
      one-standard-error rule, cheapest first; so `online=True` never returns a model worse
      there than `online=False`, and costs one search more where rotations are proposed.
      `log` names the rotated layers and every finalist's score.
    - `tol`: largest allowed relative output change on `example_inputs` (float64 evaluation);
      default by the weights' dtype (`1e-9` float64, `1e-5` float32, `1e-2` float16).

    **Returns:** the equalized model. Raises `GaugeError` if its outputs moved by more than
    `tol` (which would mean a factor does not describe a symmetry of this model).
    """
    kw = dict(
        bits=bits, granularity=granularity, objective=objective, sweeps=sweeps,
        rotations=rotations, search=search, act_bits=act_bits, scheme=scheme, learn=learn,
        learn_scales=learn_scales, distance=distance, validation=validation,
        validation_distance=validation_distance,
    )  # fmt: skip
    rotate: tuple[str, ...] = ()
    if online:
        group, elem, rotate = _online_element(model, example_inputs, group, log, kw)
    else:
        group, elem = equalizing_element(model, example_inputs, group=group, log=log, **kw)
    new = group.act(model, elem)
    tol = drift_tolerance(model_dtype(model)) if tol is None else tol
    moved = exact_invariance_error(model, new, example_inputs)
    if not moved <= tol:
        raise GaugeError(
            f"equalization changed the outputs of {type(model).__name__} by "
            f"{moved:.2e} (> {tol:.0e}); a gauge factor does not hold for it"
        )
    if rotate:
        new = rotate_inputs_online(new, rotate)
        moved = exact_invariance_error(model, new, example_inputs)
        if not moved <= tol:
            raise GaugeError(
                f"online rotations changed the outputs of {type(model).__name__} by "
                f"{moved:.2e} (> {tol:.0e})"
            )
    return new


def _double_state(model: nn.Module) -> State:
    """`model`'s state with its floating-point tensors in float64."""
    return {k: v.double() if v.is_floating_point() else v for k, v in model_state(model).items()}


_ONLINE_NEEDS_OUTPUT = "online rotations need objective='output': they are judged on outputs"


def _aimed(
    scheme: QuantScheme | str | None, bits: int, granularity: str, act_bits: int | None
) -> QuantScheme:
    """The scheme the output objective rounds as: `scheme`, else the one that `bits`,
    `granularity` and `act_bits` describe."""
    if scheme is not None:
        return QuantScheme.of(scheme)
    return QuantScheme(bits, granularity, act_bits=act_bits)


def _online_choice(
    model: nn.Module,
    inputs: Any,
    validation: Any,
    scheme: QuantScheme | str | None,
    bits: int,
    granularity: str,
    act_bits: int | None,
    objective: str,
    distance: OutputDistance,
    validation_distance: OutputDistance | None,
    log: Callable[[str], None] | None,
) -> tuple[str, ...]:
    """The Linear layers that `equalize(..., online=True)` rotates online: those that
    `online_layers` proposes, all of them or none, kept only where together they lower the
    rounded model's output distance on `inputs` (and on `validation`, when given) at the
    identity element."""
    if objective != "output":
        raise GaugeError(_ONLINE_NEEDS_OUTPUT)
    sch = _aimed(scheme, bits, granularity, act_bits)
    # a model with no Linear input to rotate (untied) gets none: `online=True` asks where
    # rotations pay, and on such a model nowhere does
    proposed = tuple(online_layers(model, inputs, sch)) if rotatable_layers(model) else ()
    start = model_state(model)
    kept = bool(proposed)
    for data, dist in _online_checks(inputs, validation, distance, validation_distance):
        if not kept:
            break
        with_, without = _noise_with_and_without(model, data, dist, sch, proposed, start, start)
        kept = with_ < without
    if log is not None:
        what = ", ".join(proposed) if proposed else "none proposed"
        log(f"online rotations: {'kept' if kept else 'not kept'} ({len(proposed)}: {what})")
    return proposed if kept else ()


def _online_element(
    model: nn.Module, inputs: Any, group: GaugeGroup | None, log, kw: dict
) -> tuple[GaugeGroup, Element, tuple[str, ...]]:
    """`equalize(..., online=True)`'s element and the layers it rotates online.

    Searched: the weights-only element, and, where `_online_choice` keeps the rotations
    that `online_layers` proposes, the element searched with them. Three sets of layers to
    rotate, each read off the model and its group: the proposed ones; the unreached ones,
    every rotatable Linear whose input no orthogonal factor of the group rotates (after a
    gated product, after the heads' values: QuaRot's online places, found without names;
    the readers of a residual stream get a rotation merged into the weights for free); and
    all of them (QuaRot rotating everything, which the per-layer gain of `online_layers`
    does not see: rotations that each cut their layer's error less than in half can lower
    the output's together). Judged where the element is chosen (validation, else
    calibration) by the one-standard-error rule (`select_simplest`), cheapest first: the
    weights-only element without online rotations (the reference: the result is never
    worse there than `online=False`'s), then each searched element with each set, smaller
    sets first. More rotations are kept only where they beat the cheaper finalists by more
    than the validation noise."""
    validation, scheme = kw["validation"], kw["scheme"]
    bits, granularity, act_bits = kw["bits"], kw["granularity"], kw["act_bits"]
    proposed = _online_choice(
        model, inputs, validation, scheme, bits, granularity, act_bits, kw["objective"],
        kw["distance"], kw["validation_distance"], log,
    )  # fmt: skip
    # the weights-only search logs as the element of `online=False` when nothing is proposed
    wlog = log if log is None or not proposed else (lambda line: log(f"weights only: {line}"))
    group, plain = equalizing_element(model, inputs, group=group, log=wlog, **kw)
    every = rotatable_layers(model)
    searched = [("weights-only element", plain)]
    if proposed:
        _, elem = equalizing_element(model, inputs, group=group, log=log, online=proposed, **kw)
        searched.append(("online element", elem))
    unreached = tuple(n for n in every if n not in _group_rotated_inputs(group, model))
    sets: list[tuple[str, tuple[str, ...]]] = []
    for label, rot in (
        (f"{len(proposed)} proposed", proposed),
        (f"all {len(every)}", every),
        (f"{len(unreached)} unreached", unreached),
    ):
        if rot and all(set(rot) != set(r) for _, r in sets):
            sets.append((label, rot))
    if not sets:
        return group, plain, ()
    data, dist = _online_checks(inputs, validation, kw["distance"], kw["validation_distance"])[-1]
    start = _double_state(model)
    names = quantized_params(model)
    aim = _aimed(scheme, bits, granularity, act_bits)
    rotations: dict[str, tuple[str, ...]] = {"weights only": ()}
    finalists = [Candidate("weights only", plain, group.act_state(start, plain, validate=False))]
    for which, rot in sorted(sets, key=lambda s: len(s[1])):  # cheapest first
        for lab, e in searched:
            label = f"{lab} + {which} online"
            rotations[label] = rot
            finalists.append(Candidate(label, e, group.act_state(start, e, validate=False)))
    rounded = {r: _rounded_outputs(model, data, names, aim, r) for r in rotations.values()}
    chosen, scores, why = select_simplest(
        finalists[0],
        finalists[1:],
        lambda c: rounded[rotations[c.label]][0](c.state),
        rounded[()][1],  # the float model's outputs, the same for every set
        dist,
    )
    if log is not None:
        where = "validation" if validation is not None else "calibration"
        listed = ", ".join(f"{k} {v:.6g}" for k, v in scores.items())
        log(f"online rotations on {where}: {listed}; kept {chosen.label} ({why})")
    return group, chosen.element, rotations[chosen.label]


def _group_rotated_inputs(group: GaugeGroup, model: nn.Module) -> set[str]:
    """The Linear layers whose input an orthogonal factor of `group` rotates (the readers
    of a residual stream, through its norm's gain or not): a rotation merged into the
    weights reaches them for free, where an online one costs a transform per token."""
    transposed = transposed_params(model)
    axis = {ConjugatedColumns: 1, RotateColumns: 1, ConjugatedRows: 0, RotateRows: 0}
    out = set()
    for f in group.factors:
        if not isinstance(f, OrthogonalFactor):
            continue
        for t in f.terms:
            ax = t.axis if isinstance(t, RotateBlock) else axis.get(type(t))
            name, _, leaf = t.param.rpartition(".")
            if leaf == "weight" and ax == (0 if t.param in transposed else 1):
                out.add(name)
    return out


def _online_checks(
    inputs: Any,
    validation: Any,
    distance: OutputDistance,
    validation_distance: OutputDistance | None,
) -> list[tuple[Any, OutputDistance]]:
    """Where online rotations are judged, as `(data, distance)`: the calibration inputs,
    then `validation` when given (the last one is where the element is chosen)."""
    checks = [(inputs, distance)]
    if validation is not None:
        checks.append((validation, validation_distance or distance))
    return checks


def _noise_with_and_without(
    model: nn.Module,
    data: Any,
    dist: OutputDistance,
    scheme: QuantScheme,
    rotate: Collection[str],
    with_state: State,
    without_state: State,
) -> tuple[float, float]:
    """The rounded model's output distance on `data` with the layers `rotate` rotated online
    (weights `with_state`) and without online rotations (weights `without_state`)."""
    names = quantized_params(model)
    return (
        _output_noise(model, data, names, scheme, dist, rotate)(with_state),
        _output_noise(model, data, names, scheme, dist)(without_state),
    )


def _data_driven(
    model: nn.Module,
    inputs: Any,
    factors: list,
    names: list[str],
    start: State,
    best: tuple[float, dict, State],
    err: Callable[[State], float],
    bits: int,
    per_channel: bool,
    search: int,
    strengths: tuple[float, ...],
    group_size: int | None,
) -> tuple[tuple[float, dict, State], list[Candidate]]:
    """Data-driven candidates from `start`, the model's state in float64 (SmoothQuant's
    balance of input and weight ranges at each of `strengths`; AWQ's activation-aware
    scales, one exponent per factor picked on `err`; the sensitivity-weighted noise-model
    optimum, with one step per group of `group_size` when given), each kept where it beats
    `best`, then a local search on `err` from the best; returns the new `(err, element,
    state)` and the candidates, in order of how much each fitted to the calibration data."""
    scales = [f for f in factors if isinstance(f, RescalingFactor)]
    if not scales:
        return best, []
    e_best, elem, state = best
    # in order of how much each fits to the calibration data (validation prefers the first
    # of those within noise of the best): closed forms, one exponent per factor, per channel
    act = input_ranges(model, inputs, names) if strengths else {}
    tr = transposed_params(model)
    candidates = [
        (f"smoothing {s:g}", smoothing_scales(scales, start, act, strength=s, transposed=tr))
        for s in strengths
    ]
    ident = {f.name: f.identity(torch.float64) for f in factors}
    # AWQ: one exponent per factor on the mean input magnitudes, picked on `err`
    means = input_means(model, inputs, names)
    aware, _, _ = activation_aware_search(scales, start, means, err, transposed=tr)
    candidates.append(("activation-aware", aware))
    sens = sensitivities(model, cast_floats(inputs, torch.float64), start, names)
    noise = noise_model_scales(
        scales, start, names, sens, bits=bits, per_channel=per_channel, group_size=group_size
    )
    candidates.append(("noise model", noise))
    closed = []
    for label, alphas in candidates:
        trial = start
        for f, a in zip(scales, alphas):
            trial = f.apply(trial, a)
        cand = {**ident, **{f.name: a for f, a in zip(scales, alphas)}}
        closed.append(Candidate(label, cand, trial))
        e = err(trial)
        if e < e_best:
            e_best, state, elem = e, trial, cand
    moves, state, e_best = local_search(scales, state, err, budget=search)
    elem = dict(elem)
    for f, a in zip(scales, moves):
        elem[f.name] = f.compose(elem[f.name], a)
    return (e_best, elem, state), closed
