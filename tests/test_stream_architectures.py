"""Streaming checkpoints of other architectures than a causal LM: the meta model is the class
that `config.json` names (a base model, an encoder, an encoder-decoder), its example input
has no more tokens than the config's positions and decoder tokens for an encoder-decoder,
and the graph rule that looks through DeBERTa's mask of ones evaluates it from shapes.

Before, every checkpoint was built as `AutoModelForCausalLM` (a saved `LlamaModel` did not
match its names), 8 tokens overran 6 positions, `T5Model` had no decoder input, and
DeBERTa's discovery called `.item()` on a meta tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gaugenet import GaugeError
from gaugenet.stream import ShardedCheckpoint, stream_equalize

transformers = pytest.importorskip("transformers")

T = 6  # positions of every config below (fewer than the 8 tokens streaming would use)

CASES = {
    "LlamaModel": (
        "LlamaConfig",
        dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=T),
        True,
    ),
    "T5Model": (
        "T5Config",
        dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, n_positions=T),
        True,
    ),
    "GPTNeoModel": (
        "GPTNeoConfig",
        dict(hidden_size=16, num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
             max_position_embeddings=T),
        False,
    ),
    "DebertaV2Model": (
        "DebertaV2Config",
        dict(hidden_size=16, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=T),
        False,
    ),
}  # fmt: skip


def _build(cls: str, cfg: str, kw: dict) -> torch.nn.Module:
    config = getattr(transformers, cfg)(vocab_size=32, num_hidden_layers=1, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).float().eval()
    return _uneven(model)


def _uneven(model: torch.nn.Module) -> torch.nn.Module:
    """Uneven gains (every 1-D weight times a log ramp), so that a rescaling has work to do."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.mul_(torch.logspace(-1, 1, p.numel()))
    return model


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 32, (2, T), generator=torch.Generator().manual_seed(1))
    call = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        call["decoder_input_ids"] = ids
    with torch.no_grad():
        return model(**call).last_hidden_state


@pytest.mark.slow
@pytest.mark.parametrize("cls", sorted(CASES))
def test_streams_the_named_architecture(cls: str, tmp_path: Path) -> None:
    cfg, kw, moves = CASES[cls]
    model = _build(cls, cfg, kw)
    model.save_pretrained(tmp_path / "in", max_shard_size="4KB")
    assert len(ShardedCheckpoint(tmp_path / "in").shards) > 1
    meta = ShardedCheckpoint(tmp_path / "in").meta_model()
    assert type(meta).__name__ == cls
    report = stream_equalize(tmp_path / "in", tmp_path / "eq", bits=4)
    if moves:  # RMSNorm / T5's norm gains reach the next Linear layers: moved
        assert report.applied > 0 and report.error_after < report.error_before
    out = getattr(transformers, cls).from_pretrained(tmp_path / "eq").float().eval()
    y, y2 = _outputs(model), _outputs(out)
    assert float((y2 - y).abs().max() / y.abs().max()) < 1e-5  # float32 storage


def test_streams_a_vision_checkpoint_with_image_inputs(tmp_path: Path) -> None:
    """A vision model has no token vocabulary: its meta example input is one image of the
    config's size (before, token ids, and ConvNext's discovery failed on them). Its
    LayerNorm gains reach the next layers and are moved; the function is kept."""
    config = transformers.ConvNextConfig(
        image_size=8, num_channels=2, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2
    )
    torch.manual_seed(0)
    model = _uneven(transformers.ConvNextModel(config).float().eval())
    model.save_pretrained(tmp_path / "in", max_shard_size="4KB")
    report = stream_equalize(tmp_path / "in", tmp_path / "eq", bits=4)
    assert report.applied > 0 and report.error_after < report.error_before
    _same_on_images(model, transformers.ConvNextModel.from_pretrained(tmp_path / "eq"))


def _same_on_images(model: torch.nn.Module, out: torch.nn.Module) -> None:
    """`out` computes `model`'s function on images (float32 storage), with moved weights."""
    out = out.float().eval()
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, y2 = model(pixel_values=x).last_hidden_state, out(pixel_values=x).last_hidden_state
    assert float((y2 - y).abs().max() / y.abs().max()) < 1e-5
    # negative: the written weights are not the input's
    moved = [k for k, v in out.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert moved


def _vision(cls: str, cfg: str, **kw) -> torch.nn.Module:
    config = getattr(transformers, cfg)(
        image_size=8, patch_size=4, num_channels=2, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return _uneven(getattr(transformers, cls)(config).float().eval())


@pytest.mark.parametrize("cls", ["DeiTModel", "BeitModel"])
def test_streams_a_checkpoint_that_transformers_renames(cls: str, tmp_path: Path) -> None:
    """`transformers` 5 renames DeiT's and BEiT's stored tensors when it loads them
    (`encoder.layer.0.attention.attention.query` is `layers.0.attention.q_proj`), so the
    meta model's names were not the checkpoint's and streaming refused it. Now the checkpoint
    is read under the model's names and written under the stored ones: the output has the
    input's names, loads, and computes the same function. BEiT also has a vocabulary (masked
    image modelling): its example input is still an image, since its forward takes pixels."""
    model = _vision(cls, cls.replace("Model", "Config"))
    model.save_pretrained(tmp_path / "in", max_shard_size="1KB")
    ckpt = ShardedCheckpoint(tmp_path / "in")
    stored = set(ckpt.weight_map)
    assert stored - set(model.state_dict())  # names the model does not have
    report = stream_equalize(tmp_path / "in", tmp_path / "eq", bits=4)
    assert report.applied > 0 and report.error_after < report.error_before
    assert set(ShardedCheckpoint(tmp_path / "eq").weight_map) == stored
    _same_on_images(model, getattr(transformers, cls).from_pretrained(tmp_path / "eq"))


def test_a_checkpoint_whose_tensors_transformers_converts_is_refused(tmp_path: Path) -> None:
    """Mixtral's experts are stored one by one and merged into one tensor on loading: not a
    renaming, so streaming says so (a `GaugeError` naming the tensor), never a wrong map."""
    config = transformers.MixtralConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
        max_position_embeddings=8,
    )  # fmt: skip
    transformers.MixtralModel(config).save_pretrained(tmp_path / "in", max_shard_size="4KB")
    with pytest.raises(GaugeError, match=r"converts the stored tensor '.*experts.*"):
        stream_equalize(tmp_path / "in", tmp_path / "eq", bits=4)
    assert not (tmp_path / "eq").exists()


def test_streams_a_speech_encoder_with_audio_features(tmp_path: Path) -> None:
    """Whisper's encoder takes log-mel features first, of exactly `2 · max_source_positions`
    frames. Before, streaming fed it token ids and its example forward failed; now its meta
    input is one spectrogram of the config's size. The output computes the input's
    function, with moved weights."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from gaugenet.io import sample_inputs

    cfg = transformers.WhisperConfig(
        d_model=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16,
        num_mel_bins=4, max_source_positions=4, vocab_size=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _uneven(WhisperEncoder(cfg).float().eval())
    x = sample_inputs(model, 3)
    assert x.shape == (3, 4, 8) and x.is_floating_point()
    model.save_pretrained(tmp_path / "in", max_shard_size="1KB")
    assert len(ShardedCheckpoint(tmp_path / "in").shards) > 1
    report = stream_equalize(tmp_path / "in", tmp_path / "eq", bits=4)
    assert report.applied > 0 and report.error_after < report.error_before
    out = WhisperEncoder.from_pretrained(tmp_path / "eq").float().eval()
    with torch.no_grad():
        y, y2 = model(x).last_hidden_state, out(x).last_hidden_state
    assert float((y2 - y).abs().max() / y.abs().max()) < 1e-5
    moved = [k for k, v in out.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert moved
