"""Hugging Face models: the class a folder's `config.json` names, and token inputs its config
allows."""

from __future__ import annotations

from typing import Any

__all__ = ["TOKENS", "image_shape", "named_class", "token_call", "token_lengths"]


def named_class(config: Any) -> type | None:
    """The class `config.architectures` names (`GPT2LMHeadModel`, `LlamaModel`, ...) when
    `transformers` has it and it is a model class, else `None` (the caller falls back to an
    `Auto` class). Nothing is imported from the folder: no remote code."""
    import transformers

    named = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, named, None) if isinstance(named, str) else None
    ok = isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    return cls if ok else None


#: tokens per sample input of a Hugging Face model, at most
TOKENS = 8


def token_lengths(config: Any) -> list[int]:
    """Sequence lengths to try for a token input, longest first: `TOKENS`, or fewer where
    the config allows fewer positions (`max_position_embeddings`, `n_positions`,
    `max_seq_len`), then halved down to 1 (a model that offsets its positions, as RoBERTa
    does, runs on fewer tokens than it has positions)."""
    n = TOKENS
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        limit = getattr(config, attr, None)
        if isinstance(limit, int) and limit > 0:
            n = min(n, limit)
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def token_call(config: Any, ids: Any) -> Any:
    """The input of a Hugging Face model for token ids `ids` `(batch, length)`: `ids`
    itself, or `input_ids` and as many `decoder_input_ids` for an encoder-decoder."""
    if getattr(config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids}
    return ids


def image_shape(config: Any) -> tuple[int, int, int] | None:
    """`(channels, height, width)` of one image for a vision model's config (ViT and kin:
    `num_channels` and `image_size`) that has no token vocabulary; else `None`."""
    if config is None or hasattr(config, "vocab_size"):
        return None
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if not isinstance(channels, int) or not isinstance(size, (int, tuple, list)):
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return (channels, int(hw[0]), int(hw[1]))
