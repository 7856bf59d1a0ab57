"""A one-layer Llama causal LM (float64, random weights) with one loud residual feature:
the model the equalization tests rotate."""

from __future__ import annotations

import torch
from torch import nn

import gaugenet
from gaugenet.groups import GaugeGroup, OrthogonalFactor


def loud_llama() -> tuple[nn.Module, dict, GaugeGroup, OrthogonalFactor]:
    """`(model, inputs, group, rotation)`: the residual stream's feature 0 is 30 times
    louder in the attention and MLP outputs, so rounding it hurts unless it is rotated."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=6,
        use_cache=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
            elif n.endswith(("o_proj.weight", "down_proj.weight")):
                p[0] *= 30  # one loud residual feature
    x = {"input_ids": torch.randint(0, 24, (16, 6), generator=torch.Generator().manual_seed(0))}
    group = gaugenet.symmetries(model, x)
    (rot,) = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    return model, x, group, rot
