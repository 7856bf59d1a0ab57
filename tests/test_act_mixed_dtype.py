"""A float64 group element (what `sample` and the algebra give) acting on a float32 model:
the rescalings before it promote some weights to float64, and the value-bias shift of
attention multiplied the promoted output weights with its float32 shift, a raw
`RuntimeError` ("both inputs should have same dtype") that `certify` reported as factors
that do not compose (act check `inf`, verdict wrong) on a float32 Persimmon."""

from __future__ import annotations

import torch

import gaugenet
from tiny_hf import tiny_hf

PERSIMMON = dict(
    vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    num_attention_heads=2, max_position_embeddings=6, use_cache=False,
)  # fmt: skip


def test_float64_elements_act_on_a_float32_model() -> None:
    m, x = tiny_hf("PersimmonModel", "PersimmonConfig", **PERSIMMON)
    m32 = m.float()
    group = gaugenet.symmetries(m32, x)
    assert any("value_shift" in f.name for f in group.factors)
    for seed in range(3):
        elem = group.sample(torch.Generator().manual_seed(seed))
        moved = group.act(m32, elem)
        assert all(p.dtype == torch.float32 for p in moved.parameters())
        assert gaugenet.invariance_error(m32, moved, x) < 1e-4  # float32 rounding
    # certify acts with the whole group at once: finite and within tolerance now
    # (the tangent check of the query-norm kernel in float32 is a separate matter)
    found = gaugenet.certify(m32, x).to_dict()
    assert found["act_error"] < found["act_tol"]
