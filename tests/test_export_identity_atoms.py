"""`torch.export.unflatten` loses a preserved module call that computes nothing (ModernBERT's
first layer reads its input through an `nn.Identity` where later layers have a norm): the
capture then inlines the atoms that hold no parameters or buffers and analyzes the model
(`_capture.py`). Before, both captures refused it."""

from __future__ import annotations

import torch
from torch import nn

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._capture import export_graph
from gaugenet.discovery._float64 import keep_float64
from tiny_hf import tiny_hf


def _modernbert() -> tuple[nn.Module, dict]:
    return tiny_hf(
        "ModernBertModel",
        "ModernBertConfig",
        vocab_size=24,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=6,
        pad_token_id=0,
    )


def test_identity_atom_does_not_stop_the_export() -> None:
    model, x = _modernbert()
    assert isinstance(model.layers[0].attn_norm, nn.Identity)
    gm, _ = export_graph(model, (), x)
    assert not any(n.op == "call_module" and "attn_norm" in str(n.target) for n in gm.graph.nodes)
    # the modules with parameters stay whole
    assert any(n.op == "call_module" and str(n.target).endswith("Wqkv") for n in gm.graph.nodes)


def test_modernbert_is_analyzed_and_its_factors_hold() -> None:
    model, x = _modernbert()
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    assert group.dim > 100  # attention GL, LayerNorm kernels and offsets, the MLP's scales
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-10
    with torch.no_grad(), keep_float64():  # its rotary tables are float32 otherwise
        ref = model(**x)[0]
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            moved = group.act(model, group.sample(gen))(**x)[0]
            assert relative_error(moved, ref) < 1e-10
