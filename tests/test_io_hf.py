"""Hugging Face folders in the commands: loaded as the class `config.json` names (a language
model with its head, which is rounded too), and sample token inputs that the model runs:
no longer than its positions allow (RoBERTa offsets its positions by two), with decoder
tokens for an encoder-decoder.

Before, every folder was loaded with `AutoModel` (a causal LM lost its head), and the
commands fed 8 tokens to any model (a model with fewer positions failed with a raw
`IndexError` or `RuntimeError`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gaugenet.io import load_model, sample_inputs
from gaugenet.io._hf import TOKENS, named_class, token_lengths

transformers = pytest.importorskip("transformers")


def _save(model: torch.nn.Module, path: Path) -> str:
    model.save_pretrained(path)
    return str(path)


def test_a_causal_lm_folder_loads_with_its_head(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=6)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    loaded = load_model(_save(model, tmp_path / "m"))
    assert type(loaded) is transformers.GPT2LMHeadModel
    assert named_class(loaded.config) is transformers.GPT2LMHeadModel
    x = sample_inputs(loaded, 3)
    assert x.shape == (3, 6)  # the config's 6 positions, not 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    # a config naming no class transformers has falls back to AutoModel (None here)
    loaded.config.architectures = ["NotAModel"]
    assert named_class(loaded.config) is None


def test_token_lengths() -> None:
    assert token_lengths(transformers.LlamaConfig()) == [TOKENS, 4, 2, 1]
    assert token_lengths(transformers.GPT2Config(n_positions=6)) == [6, 3, 1]
    assert token_lengths(object()) == [TOKENS, 4, 2, 1]


def test_sample_inputs_run_with_offset_positions_and_decoders() -> None:
    cfg = transformers.RobertaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=6,
    )  # fmt: skip
    roberta = transformers.RobertaModel(cfg).eval()
    x = sample_inputs(roberta, 2)
    assert x.shape == (2, 3)  # positions 2.. of 6: 6 tokens would overrun, 3 run
    with torch.no_grad():
        roberta(x)
        with pytest.raises((IndexError, RuntimeError)):  # out of range
            roberta(torch.zeros(1, 6, dtype=torch.long))
    t5 = transformers.T5Model(
        transformers.T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                              num_heads=2)
    ).eval()  # fmt: skip
    call = sample_inputs(t5, 2)
    assert set(call) == {"input_ids", "decoder_input_ids"}
    assert call["input_ids"].shape == (2, TOKENS)
    with torch.no_grad():
        t5(**call)


def test_vision_models_get_images_of_their_size() -> None:
    cfg = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4, num_channels=3,
    )  # fmt: skip
    vit = transformers.ViTModel(cfg).eval()
    x = sample_inputs(vit, 2)
    assert x.shape == (2, 3, 8, 8)  # not the 16 × 16 the first Conv2d would suggest
    with torch.no_grad():
        vit(x)


def test_quantize_command_rounds_a_language_models_head(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from gaugenet.apply import quantize
    from gaugenet.cli._app import _register, app

    _register()
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    spec = _save(model, tmp_path / "m")
    out = tmp_path / "q.safetensors"
    r = CliRunner().invoke(app, ["quantize", spec, "--out", str(out), "--scheme", "w4"])
    assert r.exit_code == 0, r.output
    state = load_file(str(out))
    assert set(state) == set(model.state_dict())  # the names of the folder's own class
    want = quantize(model, "w4").state_dict()
    assert torch.equal(state["lm_head.weight"], want["lm_head.weight"])
    assert not torch.equal(state["lm_head.weight"], model.lm_head.weight.detach())


BROKEN = """
import torch
from torch import nn
class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
    def forward(self, x):
        raise ValueError("this model needs another input")
def broken():
    return Broken()
"""


def test_quantize_command_says_why_the_model_does_not_run(tmp_path: Path) -> None:
    """A model that fails on the sample inputs is refused with exit code 2 and its own
    error in the message (it was an 'unexpected' error, exit code 1)."""
    from typer.testing import CliRunner

    from gaugenet.cli._app import _register, app

    _register()
    (tmp_path / "arch.py").write_text(BROKEN)
    out = tmp_path / "q.safetensors"
    r = CliRunner().invoke(app, ["quantize", f"{tmp_path / 'arch.py'}:broken", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "needs another input" in r.output and "--input-shape" in r.output
    assert not out.exists()


def test_a_class_only_its_modeling_module_exports_is_loaded(tmp_path: Path) -> None:
    """A saved `WhisperEncoder` names a class that `transformers` exports from its
    modeling module only. Before, the folder was built as `WhisperModel` (encoder and
    decoder), which failed on the tiny config's token ids; now it loads as the encoder it
    is, and computes the saved model's function. A name that is no model class is refused
    as before (`None`: the `Auto` fallback)."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = transformers.WhisperConfig(
        d_model=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16,
        num_mel_bins=4, max_source_positions=4, vocab_size=24,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperEncoder(cfg).eval()
    loaded = load_model(_save(model, tmp_path / "m"))
    assert type(loaded) is WhisperEncoder
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state)
    # its sample inputs are log-mel features of the one length it accepts (before: token
    # ids, and the commands needed --input-shape 4,8)
    from typer.testing import CliRunner

    from gaugenet.cli._app import _register, app

    _register()
    out = tmp_path / "eq.safetensors"
    r = CliRunner().invoke(app, ["equalize", str(tmp_path / "m"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    loaded.config.architectures = ["WhisperEncoderLayer"]  # in that module, not a model
    assert named_class(loaded.config) is None
    loaded.config.model_type = "not-a-model"
    assert named_class(loaded.config) is None
