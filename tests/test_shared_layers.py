"""A layer applied several times with the same weights (ALBERT shares one layer across its
depth; `albert-base-v2` applies it 12 times): each application is an attention core with the
same projections, and their factors are one transformation of the same weights, a symmetry
of every application at once. Discovery keeps each once (before, the repeated names made the
group refuse itself); factors of one name that differ are dropped, with a breaker. The same
for the layer's LayerNorm kernels and shifts: kept once when every application derives the
same one (`_build._applied_alike`)."""

from __future__ import annotations

import torch

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._same import shared_cores
from gaugenet.groups import RescalingFactor, Scale
from tiny_hf import tiny_hf

_LAYER = "encoder.albert_layer_groups.0.albert_layers.0.attention"


def _albert(layers: int):
    return tiny_hf(
        "AlbertModel",
        "AlbertConfig",
        vocab_size=24,
        hidden_size=8,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=6,
        type_vocab_size=1,
        embedding_size=8,
    )


def _out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)[0]


def test_a_shared_layer_gives_its_attention_factors_once() -> None:
    model, x = _albert(layers=3)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    names = [f.name for f in group.factors]
    assert len(names) == len(set(names))
    qk = group.factor(f"{_LAYER}.qk")
    vo = group.factor(f"{_LAYER}.vo")
    assert qk.dim == vo.dim == 2 * 4 * 4
    ref = _out(model, x)
    gen = torch.Generator().manual_seed(0)
    for f in (qk, vo, group.factor(f"{_LAYER}.key_shift")):
        assert relative_error(_out(group.act(model, {f.name: f.sample(gen)}), x), ref) < 1e-12
    assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-12


def test_the_query_map_alone_changes_a_shared_layer() -> None:
    """Negative: the shared query rows moved by the element, the key rows left alone."""
    model, x = _albert(layers=3)
    group = gaugenet.symmetries(model, x)
    qk = group.factor(f"{_LAYER}.qk")
    moved = group.act(model, {qk.name: qk.sample(torch.Generator().manual_seed(0))})
    layer = moved.encoder.albert_layer_groups[0].albert_layers[0].attention
    ref_layer = model.encoder.albert_layer_groups[0].albert_layers[0].attention
    with torch.no_grad():
        layer.key.weight.copy_(ref_layer.key.weight)
    assert relative_error(_out(moved, x), _out(model, x)) > 1e-3


def test_factors_of_one_name_that_differ_are_dropped() -> None:
    def scaling(index: list[int]) -> RescalingFactor:
        return RescalingFactor("s", 2, terms=(Scale("w", torch.tensor(index), 1),))

    kept, breakers = shared_cores([scaling([0, 1]), scaling([0, 1])])
    assert [f.name for f in kept] == ["s"] and not breakers
    kept, breakers = shared_cores([scaling([0, 1]), scaling([1, 0])])
    assert not kept and [b.node for b in breakers] == ["s"]


def test_a_shared_layers_norm_kernel_and_centered_outputs_are_kept_once() -> None:
    """The shared attention LayerNorm is called once per layer, each call giving the same
    kernel in the same (shared) reader rows; the output maps whose sums only LayerNorms
    read are centered at every call: each kept once, and each keeps the outputs."""
    model, x = _albert(layers=3)
    group = gaugenet.symmetries(model, x)
    layer = _LAYER.rpartition(".")[0]
    ref, gen = _out(model, x), torch.Generator().manual_seed(0)
    for name in (
        f"ln_kernel:{_LAYER}.LayerNorm",
        f"center:{_LAYER}.dense",
        f"center:{layer}.ffn_output",
    ):
        f = group.factor(name)
        assert relative_error(_out(group.act(model, {name: f.sample(gen)}), x), ref) < 1e-12
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-12


def test_shared_parameters_need_a_copy_per_use() -> None:
    """`_applied_alike`: a factor moving a parameter read by two operations is kept only
    when it was derived, the same, at least twice (once per application)."""
    from gaugenet.discovery._build import _applied_alike

    def scaling(index: list[int]) -> RescalingFactor:
        return RescalingFactor("s", 2, terms=(Scale("w", torch.tensor(index), 1),))

    uses = {"w": 2}
    assert [f.name for f in _applied_alike([scaling([0, 1])] * 2, {"w"}, uses)] == ["s"]
    assert _applied_alike([scaling([0, 1])], {"w"}, uses) == []  # one copy, two uses
    assert _applied_alike([scaling([0, 1]), scaling([1, 0])], {"w"}, uses) == []
    assert [f.name for f in _applied_alike([scaling([0, 1])], set(), {"w": 1})] == ["s"]


def test_a_shared_layer_has_one_canonical_form_per_orbit() -> None:
    model, x = _albert(layers=3)
    group = gaugenet.symmetries(model, x)
    other = group.act(model, group.sample(torch.Generator().manual_seed(3)))
    a = gaugenet.canonicalize(model, example_inputs=x, group=group)
    b = gaugenet.canonicalize(other, example_inputs=x, group=gaugenet.symmetries(other, x))
    assert relative_error(_out(a, x), _out(model, x)) < 1e-12
    assert max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters())) < 1e-10
    assert (
        max(float((p - q).abs().max()) for p, q in zip(model.parameters(), other.parameters()))
        > 1e-2
    )
