"""The attention gauge group of a real model: all-MiniLM-L6-v2 (Hugging Face BertModel)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

import gaugenet
from gaugenet.attention import QKFactor, VOFactor, align_attention, canonicalize_attention
from gaugenet.groups import model_state

SENTENCES = [
    "The cat sat on the mat.",
    "Gauge symmetries leave the function a network computes unchanged.",
    "A quick brown fox jumps over the lazy dog.",
    "Transformers attend to every token at once.",
    "It rained all day in the city.",
    "Neural ODEs integrate a learned vector field.",
    "She plays the violin beautifully.",
    "Stock prices fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def minilm():
    from gaugenet.nets import minilm as load
    from gaugenet.nets import minilm_batch

    model = load()
    enc = minilm_batch(SENTENCES)
    m64 = copy.deepcopy(model).double()
    group = gaugenet.symmetries(model)
    return model, m64, enc, group


def embed(model: nn.Module, enc: dict) -> torch.Tensor:
    """Sentence embeddings: mean of the last hidden state over the attention mask, normalized."""
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_factors(minilm):
    _, _, _, group = minilm
    qk = [f for f in group.factors if isinstance(f, QKFactor)]
    vo = [f for f in group.factors if isinstance(f, VOFactor)]
    assert len(qk) == len(vo) == 6
    assert all(f.b == 12 and f.d == 32 for f in qk + vo)  # 72 heads, each with both factors
    assert sum(f.dim for f in qk + vo) == 6 * 12 * 2 * 32**2
    # plus the softmax key-bias and value-bias shifts (2 x 6 x 384); no rescaling survives
    # GELU and LayerNorm (the LayerNorm and embedding factors: tests/test_discovery_real.py)
    attention = [f for f in group.factors if getattr(f, "layout", None) is not None]
    assert sum(f.dim for f in attention) == 6 * 12 * 2 * 32**2 + 2 * 6 * 384
    assert not group.of_kind("rescaling")
    # the heads of each layer, and its intermediate units (GELU acts elementwise)
    assert len(group.of_kind("permutation")) == 12


def _attention_part(group, g: dict) -> dict:
    return {k: v for k, v in g.items() if getattr(group.factor(k), "layout", None) is not None}


def test_random_element_keeps_embeddings(minilm, gen):
    model, m64, enc, group = minilm
    g = _attention_part(group, group.sample(gen))
    e32 = _diff(embed(group.act(model, g), enc), embed(model, enc))
    e64 = _diff(embed(group.act(m64, g), enc), embed(m64, enc))
    assert e32 < 1e-5 and e64 < 1e-11, (e32, e64)


def test_non_gauge_change_moves_embeddings(minilm, gen):
    """Negative test: `W_k ↦ W_k A` (not `A⁻ᵀ`) on one layer is no symmetry."""
    _, m64, enc, group = minilm
    bad = copy.deepcopy(m64)
    a = group.sample(gen)["encoder.layer.0.attention.qk"]
    with torch.no_grad():
        w = bad.encoder.layer[0].attention.self.key.weight
        w.copy_((a.transpose(-1, -2) @ w.reshape(12, 32, -1)).reshape(384, 384))
    assert _diff(embed(bad, enc), embed(m64, enc)) > 1e-3


def test_canonicalize_keeps_embeddings(minilm):
    model, m64, enc, group = minilm
    c32 = canonicalize_attention(model, group)
    c64 = gaugenet.canonicalize(m64, group=group)
    assert _diff(embed(c32, enc), embed(model, enc)) < 1e-5
    assert _diff(embed(c64, enc), embed(m64, enc)) < 1e-11
    st = model_state(c64)
    assert float(st["encoder.layer.3.attention.self.key.bias"].abs().max()) == 0.0


def test_align_recovers_hidden_element(minilm, gen):
    _, m64, _, group = minilm
    g = _attention_part(group, group.sample(gen))
    found = align_attention(m64, group.act(m64, g), group)
    err = max(_diff(found[k], g[k]) / float(g[k].double().abs().max().clamp_min(1)) for k in g)
    assert err < 1e-8


def test_module_names_do_not_matter():
    """Discovery reads the computation, not the module tree: a module named like a rotary
    embedding that the forward pass never calls changes nothing (rotary embeddings that are
    computed are tested in `test_discovery_attention_graph.py`)."""
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=50,
    )
    model = transformers.BertModel(cfg).eval()
    full = gaugenet.symmetries(model)
    assert any(isinstance(f, QKFactor) for f in full.factors)
    model.rotary_emb = nn.Identity()  # never called
    group = gaugenet.symmetries(model)
    assert group.dim == full.dim
    assert any(isinstance(f, QKFactor) for f in group.factors)
    assert any(isinstance(f, VOFactor) for f in group.factors)
