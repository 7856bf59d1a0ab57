"""GPT-NeoX (parallel residual, query-key-value packed per head, partial rotary): the key-bias
shift on the unrotated part of each head, the LayerNorm kernel into the strided projection,
the centered attention output beside the centered MLP output, and the whole group certified
complete against the Jacobian."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64

V, T = 64, 6
BIAS = "layers.0.attention.query_key_value.bias"


def _neox(hidden: int = 8, rotary: float = 0.5) -> tuple[torch.nn.Module, dict]:
    import transformers

    cfg = transformers.GPTNeoXConfig(
        vocab_size=V,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=T,
        rotary_pct=rotary,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXModel(cfg).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # biases and norms away from their special values
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ids = torch.randint(0, V, (64 * T,), generator=gen)
    ids[:V] = torch.arange(V)  # every token, several times
    return model, {"input_ids": ids[torch.randperm(ids.numel(), generator=gen)].reshape(64, T)}


@pytest.fixture(scope="module")
def neox():
    model, ids = _neox()
    return model, ids, gaugenet.symmetries(model, ids)


def _key_shift(group):
    (f,) = [f for f in group.factors if f.name.endswith(".key_shift")]
    return f


def test_key_shift_is_the_unrotated_part(neox) -> None:
    model, ids, group = neox
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    f = _key_shift(group)
    # head_dim 4, half rotated: 2 unrotated key coordinates per head, 2 heads
    assert f.dim == 4
    rows = f.terms[0].rows.reshape(2, 2)
    # head h packs [q, k, v] in rows 12h ... 12h + 12; its key is rows 12h + 4 ... 12h + 8
    expect = torch.stack([12 * h + 4 + torch.arange(2, 4) for h in range(2)])
    assert torch.equal(rows, expect)
    c = torch.linspace(-2.0, 3.0, 4, dtype=torch.float64)
    with keep_float64():
        shifted = group.act(model, {f.name: c})
        assert gaugenet.invariance_error(model, shifted, ids) < 1e-10
        # negative: the same shift on the rotated key coordinates changes the outputs
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            wrong.get_parameter(BIAS).view(2, 3, 4)[:, 1, :2] += c.reshape(2, 2)
        assert gaugenet.invariance_error(model, wrong, ids) > 1e-3


def test_key_shift_composes_with_the_query_key_commutant(neox) -> None:
    """Shift, then a query-key element `G` (`b_k ↦ G⁻¹ b_k`): the composition the group
    declares (the unrotated rows and columns of `G⁻¹` move the shift) acts as the two
    actions in turn, and the inverse undoes it."""
    model, ids, group = neox
    f = _key_shift(group)
    gen = torch.Generator().manual_seed(3)
    g, h = group.sample(gen, scale=0.4), group.sample(gen, scale=0.4)
    with keep_float64():
        twice = group.act(group.act(model, g), h)
        once = group.act(model, group.compose(g, h))
        back = group.act(group.act(model, g), group.inverse(g))
    with torch.no_grad():
        for name, q, r in zip(group.param_names, twice.parameters(), once.parameters()):
            assert float((q - r).abs().max()) < 1e-10 * (1 + float(q.abs().max())), name
        for p, q in zip(model.parameters(), back.parameters()):
            assert float((p - q).abs().max()) < 1e-10 * (1 + float(p.abs().max()))
    # negative: declared without the query-key move, composing gets the key bias wrong
    plain = gaugenet.GaugeGroup(
        tuple(dataclasses.replace(x, moved_by=()) if x is f else x for x in group.factors),
        group.breakers,
        group.param_names,
    )
    wrong = plain.act(model, plain.compose(g, h))
    with torch.no_grad():
        assert float((wrong.get_parameter(BIAS) - twice.get_parameter(BIAS)).abs().max()) > 1e-3


def test_canonical_key_bias(neox) -> None:
    """The canonical element of the shift zeroes the unrotated key bias, keeping the rest."""
    model, ids, group = neox
    f = _key_shift(group)
    rows = f.terms[0].rows
    assert float(model.get_parameter(BIAS)[rows].abs().max()) > 1e-2
    from gaugenet.attention._canonical import _shift_element

    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with keep_float64():
        moved = group.act(model, {f.name: _shift_element(f, state)})
        assert gaugenet.invariance_error(model, moved, ids) < 1e-10
    assert float(moved.get_parameter(BIAS)[rows].abs().max()) < 1e-15
    rest = torch.ones(24, dtype=torch.bool)
    rest[rows] = False
    assert torch.equal(moved.get_parameter(BIAS)[rest], model.get_parameter(BIAS)[rest])


def test_complete_against_the_jacobian(neox) -> None:
    """Every redundancy explained: the LayerNorm kernel into the strided projection (24
    rows), the centered attention output beside the MLP's (their biases, summed, hold one
    direction along `1`, not two), the key shift; tangents independent."""
    model, ids, group = neox
    names = {f.name: f.dim for f in group.factors}
    assert names["ln_kernel:layers.0.input_layernorm"] == 24
    assert names["center:layers.0.attention.dense"] == 8  # weight only: the bias is moved
    assert names["center:layers.0.mlp.dense_4h_to_h"] == 17
    report = gaugenet.certify(model, ids, group=group, method="exact")
    assert report.unexplained == 0 and report.exact, report
    assert report.symmetry_dim == report.n_params - report.functional_dimension
    # LayerNorm scales 8 + 8 and shifts 8 + 8, kernels 24 + 16, centered outputs: embedding
    # rows 64, MLP 17, attention 8, summed biases 8, query-key 12, value-output 32, value
    # shift 8, key shift 4
    assert report.symmetry_dim == 16 + 16 + 40 + 64 + 17 + 8 + 8 + 12 + 32 + 8 + 4 == 225
    assert not report.wrong


def test_fully_rotated_heads_have_no_key_shift() -> None:
    """Rotary on the whole head: no constant key direction survives the rotations."""
    model, ids = _neox(rotary=1.0)
    group = gaugenet.symmetries(model, ids)
    assert not [f for f in group.factors if f.name.endswith(".key_shift")]
    with torch.no_grad():
        moved = copy.deepcopy(model)
        moved.get_parameter(BIAS).view(2, 3, 4)[:, 1] += 0.5
    assert gaugenet.invariance_error(model, moved, ids) > 1e-3


def test_heads_permute_through_the_packed_projection(neox) -> None:
    """The two heads exchanged (their strided query, key and value rows, the output
    columns), the group's shifts and kernels re-indexed with them: the same function;
    exchanging the query rows alone changes it."""
    model, ids, group = neox
    (p,) = [f for f in group.of_kind("permutation") if f.name.endswith(".kv_groups")]
    swap = torch.tensor([1, 0])
    gen = torch.Generator().manual_seed(5)
    g = group.sample(gen, scale=0.3)
    with keep_float64():
        moved = group.act(model, {p.name: swap})
        assert gaugenet.invariance_error(model, moved, ids) < 1e-10
        both = group.act(model, group.compose(g, {**group.identity(), p.name: swap}))
        assert gaugenet.invariance_error(model, both, ids) < 1e-10
    wrong = copy.deepcopy(model)
    w = "layers.0.attention.query_key_value.weight"
    with torch.no_grad():
        rows = wrong.get_parameter(w).view(2, 3, 4, -1)
        rows[:, 0] = rows[:, 0].flip(0).clone()
    assert gaugenet.invariance_error(model, wrong, ids) > 1e-3
