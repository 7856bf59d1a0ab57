"""A tiny randomly initialized Hugging Face `BertModel`, small enough for exact Jacobian ranks.

Vocabulary 12, 6 positions, 2 token types, width 8, 2 heads of 4, intermediate 12, 2 layers,
with pooler. LayerNorm weights and biases, all biases and the embeddings are randomized so
that every parameter matters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["tiny_bert", "tiny_bert_inputs"]


def tiny_bert(layer_norm_eps: float = 1e-3, seed: int = 0) -> nn.Module:
    """The float64, eval-mode tiny BERT. BERT's own `eps = 1e-12` makes scaling what feeds a
    LayerNorm a symmetry up to `1e-12`; the default `1e-3` keeps that visibly broken."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=12,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=6,
        type_vocab_size=2,
        layer_norm_eps=layer_norm_eps,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif "embeddings" in name:
                p.normal_(0, 0.5)
    return model


def tiny_bert_inputs(n: int = 40, seed: int = 1) -> tuple[Tensor, None, Tensor]:
    """`(input_ids, None, token_type_ids)` for `n` sequences of 6 tokens, positional as
    `BertModel(input_ids, attention_mask, token_type_ids)` takes them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 12, (n, 6), generator=gen)
    types = torch.randint(0, 2, (n, 6), generator=gen)
    return ids, None, types
