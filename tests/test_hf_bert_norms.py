"""The LayerNorm structure of Hugging Face BERT encoders (found in the graph), checked on a
tiny randomly initialized `BertModel` small enough for an exact Jacobian rank.

Hand count (vocabulary 12, 6 positions, 2 token types, width 8, 2 heads of 4, intermediate
12, 2 layers, with pooler): attention `2 · (2 · 2 · 4² + 2 · 8) = 160` (query-key and
value-output GL, key and value shifts); LayerNorm kernels: embeddings into layer 0's
query, key, value `24`, each attention LayerNorm into its intermediate layer `2 · 12`, layer
0's output LayerNorm into layer 1's `24`, the last into the pooler `8`: `80`; β shifts of
the embeddings, both attention and the first output LayerNorm `4 · 8 = 32`; outputs along
`1` of the attention and FFN output layers `2 · (9 + 13) = 44`; embedding rows along `1`
`12 + 6 + 2` and the two moves from the token-type table `2 · 7`: `34`. Total `350`.
"""

from __future__ import annotations

import pytest
import torch

import gaugenet
from gaugenet.certify._causes import layernorm_causes
from gaugenet.nets import tiny_bert, tiny_bert_inputs

pytest.importorskip("transformers")


def _bert(eps: float) -> torch.nn.Module:
    return tiny_bert(eps)


def _inputs() -> tuple:
    return tiny_bert_inputs()


def _diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(scope="module")
def bert():
    model = _bert(1e-3)
    return model, gaugenet.symmetries(model)


def test_hand_count_and_no_hidden_redundancy(bert) -> None:
    model, group = bert
    assert group.dim == 160 + 80 + 32 + 44 + 34 == 350
    report = gaugenet.certify(model, _inputs(), group=group)
    assert report.unexplained == 0, report.lines()
    assert report.gap > 1e5
    # negative: without the LayerNorm factors the Jacobian shows exactly their dimension
    norm = ("ln_kernel:", "shift:", "center:", "move:")
    attn = gaugenet.GaugeGroup(
        tuple(f for f in group.factors if not f.name.startswith(norm)),
        group.breakers,
        group.param_names,
    )
    assert gaugenet.certify(model, _inputs(), group=attn).unexplained == 190


def test_group_laws_invariance_and_canonical_form(bert, gen) -> None:
    model, group = bert
    x = _inputs()
    for _ in range(2):
        g, h = group.sample(gen), group.sample(gen)
        both = group.act(model, group.compose(g, h))
        assert _diff(group.act(group.act(model, g), h), both) < 1e-12
        assert _diff(group.act(group.act(model, g), group.inverse(g)), model) < 1e-12
        assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-12
    ref = gaugenet.canonicalize(model, group=group)
    other = gaugenet.canonicalize(group.act(model, group.sample(gen)), group=group)
    assert _diff(ref, other) < 1e-9
    assert gaugenet.invariance_error(model, ref, x) < 1e-12


def test_tiny_layernorm_eps_is_a_near_symmetry_named_as_cause() -> None:
    """With BERT's `eps = 1e-12` scaling all that feeds a LayerNorm changes the outputs by
    ~1e-12: one redundancy per LayerNorm (5), each constructed and attributed to its norm
    by the causes, none left unexplained."""
    model = _bert(1e-12)
    x = _inputs()
    report = gaugenet.certify(model, x)
    assert report.unexplained == 5
    eps = [c for c in report.causes if "scaling input rows of a LayerNorm" in c]
    assert len(eps) == 1 and eps[0].startswith("5 directions"), report.causes
    assert not any("unexplained" in c for c in report.causes)
    lines = layernorm_causes(model, x, 1e-9)
    assert len(lines) == 5 and all("eps = 1e-12" in line for line in lines)
    assert layernorm_causes(_bert(1e-3), x, 1e-9) == []  # negative: a visible eps
