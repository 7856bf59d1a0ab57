"""Tiny Hugging Face models built from their configs for the discovery tests: float64, eval
mode, matrices of unit gain, vectors near 1 (weights, gains) or near 0 (biases), and token
batches that use every id."""

from __future__ import annotations

import torch
import transformers
from torch import Tensor, nn

from gaugenet.discovery.rules._examples import token_ids

#: a one-layer decoder block of hidden size 8, two heads of 4, MLP 16, six positions
DECODER = dict(
    vocab_size=24,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=6,
    use_cache=False,
)

#: a one-layer encoder-decoder of width 8 (BART's layout: BART, Pegasus, mBART, ...), two
#: heads, feed-forward 16, six positions
SEQ2SEQ = dict(
    vocab_size=24,
    d_model=8,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=16,
    decoder_ffn_dim=16,
    max_position_embeddings=6,
    use_cache=False,
)


def unit_gain(
    model: nn.Module, generator: torch.Generator | None = None, bias: float = 0.3
) -> nn.Module:
    """Parameters redrawn in place from `generator` (the global one, seeded by the caller,
    when `None`): matrices `randn / sqrt(fan)`, vectors named `*weight` `1 + 0.3 randn`,
    other vectors `bias · randn`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if p.ndim >= 2:
                p.copy_(r / min(p.shape) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.3 * r)
            else:
                p.copy_(bias * r)
    return model


def tiny_hf(
    cls: str, cfg: str, *, batch: int = 40, decoder: bool = False, **config
) -> tuple[nn.Module, dict[str, Tensor]]:
    """`(model, inputs)`: `transformers.<cls>` from `transformers.<cfg>(**config)`, and
    `batch` sequences of `max_position_embeddings` tokens (the decoder of an
    encoder-decoder model, `decoder=True`, reads them reversed)."""
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg)(**config)).double().eval()
    unit_gain(model)
    tokens = config.get("max_position_embeddings", 6)
    ids = token_ids(config["vocab_size"], batch, tokens)
    inputs = {"input_ids": ids}
    if decoder:
        inputs["decoder_input_ids"] = ids.flip(1)
    return model, inputs
