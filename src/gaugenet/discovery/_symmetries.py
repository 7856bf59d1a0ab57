"""`symmetries(model, example_inputs)`: the gauge group of a PyTorch model."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._errors import GaugeError, UnsupportedModelError
from ..groups import Breaker, GaugeGroup, bind_to_model
from ._attention import attention_from_graph, drop_key_compensation, key_bias_rows
from ._build import build_factors
from ._capture import export_graph
from ._centering import link_centered, without_summed_ones
from ._concat_gl import concat_gls
from ._experts import expert_unit_factors
from ._free_entries import with_free
from ._functional_layers import traced_layers
from ._functional_norms import traced_layer_norms, with_modules
from ._head_norm_link import link_head_norm_kernels
from ._inputs import Call, as_call, find_inputs, without_cache
from ._kernel import link_kernels
from ._linear_streams import StreamShiftFactor, fix_stream_labels, linear_streams, stream_factors
from ._meta import is_meta, meta_call, unchecked
from ._numeric_norms import traced_numeric_norms
from ._offset import link_offsets, settle_offsets
from ._param_linear import param_linears
from ._propagate import Propagator
from ._rms_norm import expand_rms_norms
from ._score_shift import score_bias_shifts
from ._selfcheck import self_check
from ._stream import stream_rotations, with_rotations
from ._stream_gl import with_key_rows
from ._subclass_atoms import checked_subclasses, computes_base
from ._summed_biases import summed_bias_factors
from ._trace import atom_types, is_atomic, trace
from ._unanalyzed import unanalyzed_breakers
from ._unread import drop_dead, unread_entries
from ._value_row_shift import link_value_row_shifts
from .rules.recurrent import recurrent_bias_factors

__all__ = ["register_analyzer", "symmetries"]

#: Analyzers for atomic module types: `fn(module, prefix) -> (factors, breakers)`.
_ANALYZERS: list[tuple[type[nn.Module], Callable[[nn.Module, str], tuple[list, list]]]] = []
#: Whole-model analyzers tried first: `fn(model, example_inputs) -> GaugeGroup | None`.
_MODEL_ANALYZERS: list[Callable[[nn.Module, Any], GaugeGroup | None]] = []


def register_analyzer(
    cls: type[nn.Module], fn: Callable[[nn.Module, str], tuple[list, list]]
) -> None:
    """Teach `symmetries` the internal factors of an atomic module type."""
    _ANALYZERS.append((cls, fn))


def register_model_analyzer(fn: Callable[[nn.Module, Any], GaugeGroup | None]) -> None:
    """A whole-model analyzer (e.g. for Hugging Face models); returns `None` to pass."""
    _MODEL_ANALYZERS.append(fn)


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise GaugeError(f"parameter {name} has non-finite entries (NaN or inf)")


def _atom_factors(model: nn.Module) -> tuple[list, list]:
    factors, breakers = [], []
    for name, m in model.named_modules():
        if hasattr(m, "gauge_factors"):
            f, b = m.gauge_factors(name)
        else:
            fn = _analyzer(m)
            if fn is None:
                continue
            f, b = fn(m, name)
        factors += f
        breakers += b
    return factors, breakers


def _analyzer(m: nn.Module) -> Callable[[nn.Module, str], tuple[list, list]] | None:
    """The analyzer of `m`'s type, or of a type it subclasses when the current discovery
    has shown that `m` computes that type's function (`_subclass_atoms.py`)."""
    for cls, fn in _ANALYZERS:
        if type(m) is cls or (isinstance(m, cls) and computes_base(m)):
            return fn
    return None


@bind_to_model
def symmetries(model: nn.Module, example_inputs: Any = None) -> GaugeGroup:
    """The gauge group of `model`: its continuous and discrete symmetries.

    **Arguments:**

    - `model`: any module `torch.fx` can capture; atomic layers (`Linear`, `Conv*`,
      `BatchNorm*`, activations, poolings, attention, ...) are analyzed by rules, and
      modules with a `gauge_factors(prefix)` method describe themselves.
    - `example_inputs`: one tensor, a tuple of positional inputs, or a dict of keyword
      inputs the model accepts. Optional when they can be inferred (a model starting with
      `nn.Linear`, a Hugging Face model's `dummy_inputs`, token batches).

    **Returns:** a `GaugeGroup` with `factors` and `breakers` (the operations that break
    a would-be symmetry, with reasons). Every factor has been checked on the example inputs
    (see `_selfcheck.py`): one that changes the outputs is dropped and named among the
    breakers as an internal error. Entries no output reads are one `free` factor
    (`groups/_free.py`); rows of a table read only at constant indices (positions up to the
    example's length) are claimed only when `example_inputs` are given, and hold for inputs
    of their shapes. A model on the meta device (shapes, no values) is
    analyzed from shapes alone; its group is then `unchecked` (see `_meta.py`, `check_on`).

    Raises `GaugeError` for non-finite weights or when no inputs are given or inferred,
    `UnsupportedModelError` when the model cannot be captured.
    """
    meta = is_meta(model)  # shapes only: no values to check (see `_meta.py`)
    if not meta:
        _check_finite(model)
    move = meta_call if meta else None
    call = find_inputs(model, move=move) if example_inputs is None else as_call(example_inputs)
    # rows that constant indices never select are claimed only for inputs of the shapes the
    # caller chose (indices such as positions depend on them); inferred inputs claim none
    rows = example_inputs is not None
    if meta:
        call = meta_call(call)
        group = unchecked(_discover(model, call, rows))
    else:
        group = self_check(model, call, _discover(model, call, rows))
    # the inputs the group was checked on travel with it (canonicalize and align check there)
    args, kwargs = call
    used = kwargs if kwargs and not args else args[0] if len(args) == 1 and not kwargs else args
    return dataclasses.replace(group, example_inputs=used)


def _positional(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Keyword inputs as positional ones, when they fill the first parameters of `forward`
    (what the `torch.fx` capture takes)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    names = params[len(args) : len(args) + len(kwargs)]
    if set(names) != set(kwargs):
        raise UnsupportedModelError(
            f"{type(model).__name__}: keyword inputs {sorted(kwargs)} are not the first "
            f"parameters of forward {params}; torch.fx takes positional inputs only"
        )
    return (*args, *(kwargs[n] for n in names))


def _discover(model: nn.Module, call: Call, rows: bool = True) -> GaugeGroup:
    """The group of `model` on `call`, with the subclasses of atomic types that compute
    their base's function (shown on `call`, `_subclass_atoms.py`) kept whole."""
    types = (*atom_types(), *(cls for cls, _ in _ANALYZERS))
    with checked_subclasses(model, without_cache(model, call), types):
        return _discover_graph(model, call, rows)


def _discover_graph(model: nn.Module, call: Call, rows: bool) -> GaugeGroup:
    names = tuple(n for n, _ in model.named_parameters())
    args, kwargs = without_cache(model, call)
    example = kwargs if kwargs else args
    for fn in _MODEL_ANALYZERS:
        group = fn(model, example)
        if group is not None:
            return group
    if is_atomic(model) and hasattr(model, "gauge_factors"):
        factors, breakers = model.gauge_factors("")
        return GaugeGroup(tuple(factors), tuple(breakers), names)
    try:
        flat = _positional(model, args, kwargs) if kwargs else args
        gm = trace(model, len(flat))
        functional = {
            **traced_layer_norms(gm, model),
            **traced_numeric_norms(gm, model),
            **traced_layers(gm, model),
        }
        model = with_modules(model, functional)
    except UnsupportedModelError as fx_exc:
        try:
            gm, flat = export_graph(model, args, kwargs)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{fx_exc}; {exc}") from exc
        # functional LayerNorms are analyzed as the `nn.LayerNorm`s they compute: through a
        # view of the model holding those (same parameters, same names)
        model = with_modules(model, gm.layer_norms)
    param_linears(gm, model)  # `x @ W.T`, `F.linear(x, W)` on parameters: `aten.linear`
    expand_rms_norms(gm, model)  # `nn.RMSNorm`'s one call, as the operations it computes
    drop_dead(gm)  # results no output reads: they break nothing and read nothing
    unread = unread_entries(gm, model, rows=rows)
    prop = Propagator(gm, model)
    prop.unread = unread
    try:
        with torch.no_grad():
            prop.run(*flat)
    except UnsupportedModelError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(
            f"running {type(model).__name__} on the example inputs failed: {exc}"
        ) from exc
    prop.tied_table_factors()  # tables tied under several modules (`_norm_rules.py`)
    attn, attn_breakers, projections, keys = attention_from_graph(gm, model, prop.values)
    prop.L.drop_outputs_of(projections)
    streams = linear_streams(gm, model, prop.values)
    fix_stream_labels(streams, prop)
    concat = concat_gls(gm, model, prop)
    factors, breakers = build_factors(prop.L, model)
    factors = stream_factors(streams, model, factors) + concat
    shifted = frozenset(
        p for f in factors if isinstance(f, StreamShiftFactor) for p, _ in f.terms[0].writers
    )
    factors = summed_bias_factors(gm, model, prop.values, factors, shifted)
    factors = drop_key_compensation(factors + attn, model, keys)
    factors = settle_offsets(factors, keys, key_bias_rows(factors))
    factors += score_bias_shifts(gm, model, prop.values)
    factors += expert_unit_factors(gm, model)  # hidden units of stacked experts
    factors = with_rotations(factors, stream_rotations(gm, model, prop.values))
    factors = with_key_rows(factors, key_bias_rows(factors))
    breakers += attn_breakers
    f2, b2 = _atom_factors(model)
    factors = link_centered(without_summed_ones(link_kernels(factors + f2)))
    factors = link_head_norm_kernels(factors, model)
    factors = link_value_row_shifts(factors, model)
    factors = link_offsets(factors, model)
    factors = with_free(factors, unread, model)
    b2 += unanalyzed_breakers(model)
    return GaugeGroup(tuple(factors), tuple(dict.fromkeys(breakers + b2)), names)


_ = Breaker

for _cls in (nn.LSTM, nn.GRU, nn.RNN):
    register_analyzer(_cls, recurrent_bias_factors)
