"""Helpers for the rules' example models: built in float64 and eval mode from a fixed seed,
with inputs that reach every parameter."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["DEBERTA_TINY", "DEBERTA_V3_ATTENTION", "batch", "seeded", "token_ids"]

#: a one-layer DeBERTa-v2 of width 8 (two heads of 4, MLP 16, six positions, no token
#: types) as `transformers.DebertaV2Config` settings: the claim's model and its tests'
DEBERTA_TINY = dict(
    vocab_size=24,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=6,
    type_vocab_size=0,
)

#: the attention of DeBERTa-v3 as a `transformers.DebertaV2Config`'s settings: relative
#: terms `c2p` and `p2c` from the query and key maps applied to a LayerNorm-ed table of log
#: buckets (4 here, for models of a few positions; 256 as released), no absolute positions
DEBERTA_V3_ATTENTION = dict(
    relative_attention=True,
    pos_att_type=["p2c", "c2p"],
    position_buckets=4,
    max_relative_positions=-1,
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    position_biased_input=False,
)


def seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """`make()` under a fixed seed (the global generator is left as it was), in float64 and
    eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make().double().eval()


def batch(*shape: int, seed: int = 1) -> Tensor:
    """`shape` standard-normal float64 inputs from a fixed seed."""
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def token_ids(vocab: int, *shape: int, seed: int = 1) -> Tensor:
    """Token ids of `shape` that use every one of `vocab` ids at least once."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    ids.view(-1)[:vocab] = torch.randperm(vocab, generator=g)
    return ids
