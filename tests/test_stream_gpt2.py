"""Streaming a sharded GPT-2 (LayerNorms, `Conv1D` layers stored `(in, out)`, a head tied to
the token embedding, and the default `use_cache=True`): discovery on the meta device used to
stop at the LayerNorm kernel's conditioning check (it read the gains' values), and the
recording of the layers' input shapes at the key-value cache `torch.export` cannot flatten."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gaugenet.apply import quantize
from gaugenet.stream import ShardedCheckpoint, stream_equalize, stream_quantize

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 in float32, saved in several shards."""
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).float().eval()
    assert model.config.use_cache and model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():  # uneven channel ranges, so that equalization has work to do
        for block in model.transformer.h:
            block.ln_1.weight.mul_(torch.logspace(-1, 1, 32))
    path = tmp_path_factory.mktemp("gpt2") / "in"
    model.save_pretrained(path, max_shard_size="30KB")
    assert len(ShardedCheckpoint(path).shards) > 1
    return path


def _model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_gpt2_equalizes_streamed_and_keeps_function_and_tie(ckpt) -> None:
    out = ckpt.parent / "eq"
    report = stream_equalize(ckpt, out, bits=4)
    assert report.applied > 0 and report.error_after < report.error_before
    a, b = _model(ckpt), _model(out)
    assert b.lm_head.weight is b.transformer.wte.weight
    sa, sb = a.state_dict(), b.state_dict()
    moved = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert any("ln_1" in k for k in moved) and any("c_attn" in k for k in moved)
    with torch.no_grad():
        ya, yb = a(input_ids=_ids()).logits, b(input_ids=_ids()).logits
    assert float((ya - yb).abs().max() / ya.abs().max()) < 1e-6  # float32 storage


@pytest.mark.slow
def test_gpt2_quantizes_streamed_as_in_memory(ckpt) -> None:
    """The streamed rounding is `quantize`'s: the tied head-embedding rounded once, as the
    head's weight, every `Conv1D` per output column."""
    out = ckpt.parent / "q"
    report = stream_quantize(ckpt, out, scheme="w4")
    assert report.rounded == 2 * 4 + 1
    a, b = _model(ckpt), _model(out)
    with torch.no_grad():
        y = a(input_ids=_ids()).logits
        want = quantize(a, "w4")(input_ids=_ids()).logits
        got = b(input_ids=_ids()).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert float((got - y).abs().max() / y.abs().max()) > 1e-3  # rounding moved it
