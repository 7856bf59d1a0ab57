"""Public helpers: gauge-invariant observables, canonical forms and alignment of attention."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._errors import GaugeError
from ..groups import GaugeGroup
from ..groups._group import Element, model_state
from ._canonical import canonical_attention_element
from ._factors import QKFactor, VOFactor

__all__ = ["align_attention", "canonicalize_attention", "qk_matrices", "vo_matrices"]


def _group(model: nn.Module, group: GaugeGroup | None, example_inputs: Any) -> GaugeGroup:
    if group is None:
        from ..discovery import symmetries

        group = symmetries(model, example_inputs)
    if not any(isinstance(f, QKFactor | VOFactor) for f in group.factors):
        raise GaugeError(f"{type(model).__name__}: no attention layer found in its gauge group")
    return group


def qk_matrices(
    model: nn.Module, group: GaugeGroup | None = None, example_inputs: Any = None
) -> dict[str, Tensor]:
    """`W_qk = W_q W_kᵀ` per head, by layer name: `(heads, d_q, d_k)` each (paper
    orientation, tokens as rows). Invariant under the query-key gauge `GL(d_head)`."""
    group = _group(model, group, example_inputs)
    state = model_state(model)
    return {f.layout.prefix: f.layout.qk(state) for f in group.factors if isinstance(f, QKFactor)}


def vo_matrices(
    model: nn.Module, group: GaugeGroup | None = None, example_inputs: Any = None
) -> dict[str, Tensor]:
    """`W_vo = W_v W_o` per head, by layer name: `(heads, d_v, d_out)`. Invariant under the
    value-output gauge `GL(d_v)`."""
    group = _group(model, group, example_inputs)
    state = model_state(model)
    return {f.layout.prefix: f.layout.vo(state) for f in group.factors if isinstance(f, VOFactor)}


def canonicalize_attention(
    model: nn.Module, group: GaugeGroup | None = None, example_inputs: Any = None
) -> nn.Module:
    """A copy of `model` with every attention head in its canonical (balanced SVD) form;
    see `gaugenet.attention` for the convention. The function computed is unchanged."""
    group = _group(model, group, example_inputs)
    return group.act(model, canonical_attention_element(group, model_state(model)))


def align_attention(
    model_a: nn.Module,
    model_b: nn.Module,
    group: GaugeGroup | None = None,
    example_inputs: Any = None,
) -> Element:
    """The element `g` of the attention gauge with `act(model_a, g) == model_b`, for two
    gauge-equivalent models (`A`, `C`, `α`, key shifts and head permutations).

    It is the canonical element of `model_a` followed by the inverse canonical element of
    `model_b`; unique when singular values and head invariants are distinct.
    """
    group = _group(model_a, group, example_inputs)
    ga = canonical_attention_element(group, model_state(model_a))
    gb = canonical_attention_element(group, model_state(model_b))
    return group.compose(ga, group.inverse(gb))
