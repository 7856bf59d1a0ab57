"""The canonical form is one point per orbit: the canonical form of a model moved by a random
group element equals the model's own (float64, relative to the largest weight), on tiny
Hugging Face models covering the key- and value-bias shifts, the summed biases of a parallel
block, the value-row shift and the LayerNorm offsets, the query heads of grouped-query
attention, and a position-bias table with an unread row. `align` recovers the element, and
refuses two models that are not gauge-equivalent."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet import GaugeError
from gaugenet._canonical import unfixed_factors
from gaugenet.attention._factors import KeyShiftFactor, ValueShiftFactor
from gaugenet.discovery._summed_biases import SummedBiasFactor
from gaugenet.discovery._value_row_shift import ValueRowShiftFactor
from gaugenet.discovery.rules.patterns import _Bottleneck
from gaugenet.groups import FreeFactor
from gaugenet.groups._linear_stream import LinearStreamFactor
from gaugenet.groups._offset import LayerNormOffsetFactor
from tiny_hf import DECODER, tiny_hf

torch.set_num_threads(1)

#: canonical forms of two points of an orbit agree to rounding (relative to the largest weight)
ORBIT_TOL = 1e-8

_NEOX = dict(
    vocab_size=64,  # the parallel MLP reads the embeddings alone
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=6,
    use_cache=False,
)
_GPTJ = dict(
    vocab_size=24, n_embd=8, n_layer=1, n_head=2, rotary_dim=2, n_positions=6, use_cache=False
)
_T5 = dict(
    vocab_size=24,
    d_model=8,
    d_kv=4,
    d_ff=16,
    num_layers=1,
    num_heads=2,
    relative_attention_num_buckets=4,
    max_position_embeddings=6,
)

#: `(id, model class, config class, config, factor kinds the case must have)`
CASES = [
    ("gpt_neox", "GPTNeoXModel", "GPTNeoXConfig", _NEOX, (ValueShiftFactor, SummedBiasFactor)),
    (
        "bloom",
        "BloomModel",
        "BloomConfig",
        dict(vocab_size=24, hidden_size=8, n_layer=1, n_head=2, max_position_embeddings=6),
        (ValueShiftFactor, KeyShiftFactor),
    ),
    ("gptj", "GPTJModel", "GPTJConfig", _GPTJ, (ValueRowShiftFactor, LayerNormOffsetFactor)),
    (
        "stablelm",
        "StableLmForCausalLM",
        "StableLmConfig",
        {**DECODER, "partial_rotary_factor": 0.5},
        (ValueRowShiftFactor, LayerNormOffsetFactor),
    ),
    (
        "llama_gqa",
        "LlamaModel",
        "LlamaConfig",
        {**DECODER, "num_attention_heads": 4, "num_key_value_heads": 2},
        (),
    ),
    ("t5", "T5EncoderModel", "T5Config", _T5, (FreeFactor,)),
]


def _build(case: tuple) -> tuple[nn.Module, dict, gaugenet.GaugeGroup]:
    _, cls, cfg, config, _ = case
    model, x = tiny_hf(cls, cfg, **config)
    return model, x, gaugenet.symmetries(model, x)


def _residual(a: nn.Module, b: nn.Module) -> float:
    """Largest parameter difference relative to the largest weight (as `align` measures)."""
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    return diff / max(float(q.detach().abs().max()) for q in b.parameters())


def _moved(model: nn.Module, group: gaugenet.GaugeGroup, seed: int) -> nn.Module:
    return group.act(model, group.sample(torch.Generator().manual_seed(seed), scale=0.3))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_canonical_form_is_the_same_at_every_point_of_the_orbit(case: tuple) -> None:
    model, x, group = _build(case)
    for kind in case[4]:
        assert any(isinstance(f, kind) for f in group.factors), kind.__name__
    if case[0] == "llama_gqa":
        assert any(f.name.endswith("heads[0]") for f in group.discrete)
    canon = gaugenet.canonicalize(model, example_inputs=x, group=group)
    assert gaugenet.exact_invariance_error(model, canon, x) < 1e-9
    moved = _moved(model, group, 3)
    assert _residual(moved, model) > 1e-2  # the element really moves the weights
    again = gaugenet.canonicalize(moved, example_inputs=x, group=group)
    assert _residual(again, canon) < ORBIT_TOL


def test_shift_gauges_zero_the_biases_they_move() -> None:
    """GPT-NeoX: the value bias and the key-bias entries along the shift are zero in the
    canonical form, and the second of the summed output biases holds nothing."""
    model, x, group = _build(CASES[0])
    canon = gaugenet.canonicalize(model, example_inputs=x, group=group)
    state = dict(canon.state_dict())
    checked = 0
    for f in group.factors:
        if isinstance(f, ValueShiftFactor):
            assert float(f.terms[0].entries(state, f.n).abs().max()) < 1e-12
            checked += 1
        elif isinstance(f, SummedBiasFactor):
            assert float(state[f.terms[0].into].abs().max()) < 1e-12
            checked += 1
    assert checked == 2
    # the model's own biases are not zero: the gauge moved them
    own = dict(model.state_dict())
    vs = next(f for f in group.factors if isinstance(f, ValueShiftFactor))
    assert float(vs.terms[0].entries(own, vs.n).abs().max()) > 1e-2


@pytest.mark.parametrize("index", [0, 2, 4], ids=["gpt_neox", "gptj", "llama_gqa"])
def test_align_recovers_the_element(index: int) -> None:
    model, x, group = _build(CASES[index])
    moved = _moved(model, group, 5)
    g = gaugenet.align(model, moved, group=group)
    assert _residual(group.act(model, g), moved) < 1e-9


def test_align_refuses_models_that_are_not_gauge_equivalent() -> None:
    """Two GPT-NeoX models with other weights (one bias changed, then moved along the
    orbit): no element maps one onto the other."""
    model, x, group = _build(CASES[0])
    other = _moved(model, group, 7)
    with torch.no_grad():
        other.layers[0].mlp.dense_h_to_4h.bias[0] += 0.1
    assert gaugenet.exact_invariance_error(model, other, x) > 1e-6
    with pytest.raises(GaugeError, match="not gauge-equivalent"):
        gaugenet.align(model, other, group=group)


def test_align_names_the_factor_without_a_canonical_form() -> None:
    """A linear stream's `GL` has no canonical form: two points of its orbit keep different
    "canonical" forms, and `align` says which factor stops it from deciding, rather than
    calling them not gauge-equivalent."""
    torch.manual_seed(0)
    model = _Bottleneck().double().eval()
    x = torch.randn(24, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    group = gaugenet.symmetries(model, x)
    (gl,) = [f for f in group.factors if isinstance(f, LinearStreamFactor)]
    assert unfixed_factors(group) == [gl.name]
    moved = group.act(model, {gl.name: gl.sample(torch.Generator().manual_seed(1))})
    assert gaugenet.exact_invariance_error(model, moved, x) < 1e-9
    with pytest.raises(GaugeError, match=f"no canonical form.*{gl.name}"):
        gaugenet.align(model, moved, group=group)
    # not gauge-equivalent: the message still names the factor, never a wrong "no"
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.stem.weight.add_(0.1)
    with pytest.raises(GaugeError, match=f"cannot decide.*{gl.name}"):
        gaugenet.align(model, other, group=group)
