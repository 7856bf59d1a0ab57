"""Hugging Face models: the class a folder's `config.json` names, and token inputs its config
allows."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

__all__ = [
    "TOKENS",
    "audio_shape",
    "checkpoint_renaming",
    "feature_input",
    "image_shape",
    "named_class",
    "token_call",
    "token_lengths",
]


def named_class(config: Any) -> type | None:
    """The class `config.architectures` names (`GPT2LMHeadModel`, `LlamaModel`, ...) when
    `transformers` has it (at its top level, or in the modeling module of the config's
    `model_type`, as `WhisperEncoder`) and it is a model class, else `None` (the caller
    falls back to an `Auto` class). Nothing is imported from the folder: no remote code."""
    import transformers

    named = (getattr(config, "architectures", None) or [None])[0]
    if not isinstance(named, str):
        return None
    cls = getattr(transformers, named, None)
    if cls is None:  # a class only its model's module exports (`WhisperEncoder`)
        cls = getattr(_modeling(getattr(config, "model_type", None)), named, None)
    ok = isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    return cls if ok else None


def _modeling(model_type: Any) -> Any:
    """`transformers.models.<type>.modeling_<type>` of `transformers` itself, or `None`."""
    if not isinstance(model_type, str) or not model_type.replace("-", "_").isidentifier():
        return None
    name = model_type.replace("-", "_")
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return None


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


def image_shape(config: Any, model: Any = None) -> tuple[int, int, int] | None:
    """`(channels, height, width)` of one image for a vision model (ViT and kin: its config
    has `num_channels` and `image_size`), else `None`. A vision model is one whose forward
    takes `pixel_values` first (BEiT has a vocabulary too, for masked image modelling) or,
    without `model`, a config with no token vocabulary."""
    if config is None:
        return None
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if not isinstance(channels, int) or not isinstance(size, (int, tuple, list)):
        return None
    if model is not None:
        if _first_input(model) != "pixel_values":
            return None
    elif hasattr(config, "vocab_size"):
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return (channels, int(hw[0]), int(hw[1]))


def audio_shape(config: Any, model: Any) -> tuple[int, int] | None:
    """`(mel bins, frames)` of one log-mel spectrogram for a speech encoder whose forward
    takes `input_features` first (Whisper's encoder: `num_mel_bins` features and twice
    `max_source_positions` frames, which its convolutions, the second of stride 2, turn into
    that many positions, the only length it accepts), else `None`."""
    if config is None or model is None or _first_input(model) != "input_features":
        return None
    bins, positions = (
        getattr(config, "num_mel_bins", None),
        getattr(config, "max_source_positions", None),
    )
    if not isinstance(bins, int) or not isinstance(positions, int):
        return None
    return (bins, 2 * positions)


def feature_input(config: Any, model: Any) -> tuple[str, tuple[int, ...]] | None:
    """`(argument, shape of one sample)` of the float input a Hugging Face model takes first:
    `input_features` for a speech encoder (`audio_shape`), `pixel_values` for a vision
    model (`image_shape`); `None` for a model that takes token ids."""
    audio = audio_shape(config, model)
    if audio is not None:
        return "input_features", audio
    image = image_shape(config, model)
    return None if image is None else ("pixel_values", image)


def _first_input(model: Any) -> str | None:
    """The name of the first argument of `model.forward`, `None` if it takes none."""
    params = list(inspect.signature(model.forward).parameters)
    return params[0] if params else None


def checkpoint_renaming(model: Any, stored: list[str]) -> dict[str, str] | None:
    """`{stored name: model name}` for a checkpoint whose tensors `transformers` renames when
    it loads them into `model` (its conversion mapping, `transformers` 5: ViT's
    `encoder.layer.0.attention.attention.query` is `layers.0.attention.q_proj`), `None`
    where it renames none (or has no conversion mapping). Raises `GaugeError` where the
    mapping also converts tensors (splits or merges them, as fused experts), which a name
    map cannot follow."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: checkpoints hold the model's own names
        return None
    from .._errors import GaugeError

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    out: dict[str, str] = {}
    for key in stored:
        new, converted = rename_source_key(key, renamings, converters)
        if converted is not None:
            raise GaugeError(
                f"transformers converts the stored tensor {key!r} when it loads this "
                f"{type(model).__name__} (pattern {converted!r}: tensors split or merged), "
                "which streaming does not follow: load the model and use the in-memory commands"
            )
        out[key] = new
    return out if any(k != v for k, v in out.items()) else None
