"""Scores masked by `where(mask, scores, fill)` (GPT-Neo's causal mask, in float32) are an
attention core like any other: the query-key and value-output `GL`s are found, and with
the value-bias shift of its bias-free value rows taken back by `out_proj`'s bias
(`tests/test_value_row_shift.py`) GPT-Neo's tiny model is complete."""

from __future__ import annotations

import torch

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.certify import Verdict
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from tiny_hf import tiny_hf


def _neo():
    return tiny_hf(
        "GPTNeoModel",
        "GPTNeoConfig",
        vocab_size=24,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        max_position_embeddings=6,
        use_cache=False,
    )


def _out(model, x) -> torch.Tensor:
    """The outputs with GPT-Neo's float32 scores kept in float64 (exact algebra)."""
    with torch.no_grad(), keep_float64():
        return model(**x)[0]


def test_where_masked_attention_has_its_gl_factors() -> None:
    model, x = _neo()
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    names = {f.name: f for f in group.factors}
    qk, vo = names["h.0.attn.attention.qk"], names["h.0.attn.attention.vo"]
    assert qk.dim == vo.dim == 2 * 4 * 4
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-12
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0  # complete
    ref = _out(model, x)
    g = {qk.name: qk.sample(torch.Generator().manual_seed(0), torch.float64)}
    moved = group.act(model, g)
    assert relative_error(_out(moved, x), ref) < 1e-12
    assert (
        moved.h[0].attn.attention.q_proj.weight - model.h[0].attn.attention.q_proj.weight
    ).abs().max() > 1e-2


def test_the_query_map_alone_changes_the_scores() -> None:
    """Negative: the query rows moved by the element, the key rows left as they were."""
    model, x = _neo()
    group = gaugenet.symmetries(model, x)
    qk = next(f for f in group.factors if f.name == "h.0.attn.attention.qk")
    moved = group.act(model, {qk.name: qk.sample(torch.Generator().manual_seed(0), torch.float64)})
    att, ref_att = moved.h[0].attn.attention, model.h[0].attn.attention
    with torch.no_grad():
        att.k_proj.weight.copy_(ref_att.k_proj.weight)
    assert relative_error(_out(moved, x), _out(model, x)) > 1e-3
