"""`gaugenet equalize` / `gaugenet quantize` on a sharded safetensors folder: streamed layer
by layer, the output loads with transformers, equalization keeps the function, quantization
changes it onto the scheme's grid, nothing is overwritten, bad indexes are refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import gaugenet
from gaugenet.cli._app import _register, app
from gaugenet.stream import ShardedCheckpoint, stream_equalize
from gaugenet.stream import _process as process

transformers = pytest.importorskip("transformers")
_register()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A 2-layer Llama in float32, saved in 4 shards (about 50 kB)."""
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # uneven channel ranges, so that equalization has work to do
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(torch.logspace(-1, 1, 64)[:, None])
    path = tmp_path_factory.mktemp("ckpt") / "in"
    model.save_pretrained(path, max_shard_size="30KB")
    assert len(ShardedCheckpoint(path).shards) > 1
    return path


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _weights(path: Path) -> dict[str, torch.Tensor]:
    c = ShardedCheckpoint(path)
    return {k: c.tensor(k) for k in c.weight_map}


def _cli(*args: str):
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def equalized(ckpt) -> tuple[Path, dict]:
    out = ckpt.parent / "eq"
    r = _cli("equalize", ckpt, "--out", out, "--bits", "4", "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.output)


@pytest.fixture(scope="module")
def quantized(ckpt) -> tuple[Path, dict]:
    out = ckpt.parent / "q"
    r = _cli("quantize", ckpt, "--out", out, "--scheme", "w4", "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.output)


@pytest.mark.slow
def test_equalize_streams_and_keeps_the_function(ckpt, equalized, gen) -> None:
    out, result = equalized
    # per layer: the gated MLP's rescaling and the two RMSNorm gains' rescalings; the final
    # norm's gain reaches lm_head, outside any one layer: left alone and reported
    assert result["applied"] == 6
    assert [s["factors"] for s in result["skipped"]] == ["scale:model.norm"]
    assert "whole model" in result["skipped"][0]["why"]
    assert result["error_after"] < result["error_before"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a folder as mkdir makes it
    before, after = _weights(ckpt), _weights(out)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    # it did something, where it should: the layers' MLPs, norms and attention projections
    assert moved and all(k.startswith("model.layers.") for k in moved)
    assert any(".mlp." in k for k in moved) and any("layernorm" in k for k in moved)
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    a, b = _logits(ckpt, ids), _logits(out, ids)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-6  # float32 storage


@pytest.mark.slow
def test_quantize_streams_onto_the_grid(ckpt, quantized, gen) -> None:
    out, result = quantized
    assert result["rounded"] == 15  # 7 Linear layers per block, and lm_head
    before, after = _weights(ckpt), _weights(out)
    for k, w in after.items():
        if k.endswith("proj.weight") or k == "lm_head.weight":
            step = w.abs().amax(1, keepdim=True) / 7  # per channel, 4 bits
            assert torch.allclose(w / step, torch.round(w / step), atol=1e-4)
            assert not torch.equal(w, before[k])
        else:  # embeddings and norms stay in float
            assert torch.equal(w, before[k])
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    a, b = _logits(ckpt, ids), _logits(out, ids)
    assert float((a - b).abs().max() / a.abs().max()) > 1e-3  # rounding changes the function


@pytest.mark.slow
def test_refuses_to_overwrite(ckpt, tmp_path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _cli("equalize", ckpt, "--out", out)
    assert r.exit_code == 2 and "already exists" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    stamp = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    for target in (ckpt, ckpt / "sub"):
        r = _cli("quantize", ckpt, "--out", target, "--force")
        assert r.exit_code == 2 and "never written over its input" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == stamp
    r = _cli("equalize", ckpt, "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def _drop_one(wmap: dict[str, str]) -> dict[str, str]:
    """The weight map without one tensor of a shard that holds several."""
    shards = list(wmap.values())
    gone = next(k for k, v in wmap.items() if shards.count(v) > 1)
    return {k: v for k, v in wmap.items() if k != gone}


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda idx: "{not json", "not a readable JSON index"),
        (lambda idx: json.dumps({"metadata": {}}), "no weight_map"),
        (
            lambda idx: json.dumps({"weight_map": {**idx["weight_map"], "x": "gone.safetensors"}}),
            "names the shard",
        ),
        (lambda idx: json.dumps({"weight_map": _drop_one(idx["weight_map"])}), "disagrees with"),
    ],
    ids=["json", "no-map", "missing-shard", "missing-tensor"],
)
def test_bad_index_is_refused(ckpt, tmp_path, corrupt, message) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    index = bad / "model.safetensors.index.json"
    index.write_text(corrupt(json.loads(index.read_text())))
    with pytest.raises(gaugenet.GaugeError, match=message):
        stream_equalize(bad, tmp_path / "out")
    r = _cli("equalize", bad, "--out", tmp_path / "out2")
    assert r.exit_code == 2 and "error:" in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_a_move_that_changes_the_function_is_not_written(ckpt, tmp_path, monkeypatch) -> None:
    """The local check is real: a bogus 'equalization' that scales up_proj without the
    compensating down_proj is caught on the MLP and left out."""

    def bogus(comp, start, q, bits, gran, transposed=frozenset()):
        return {k: v * 2 if "up_proj" in k else v for k, v in start.items()}

    monkeypatch.setattr(process, "_equalized", bogus)
    report = stream_equalize(ckpt, tmp_path / "out")
    assert report.applied == 0 and len(report.skipped) == 2
    assert all("outputs by" in why for _, why in report.skipped)
    before, after = _weights(ckpt), _weights(tmp_path / "out")
    assert all(torch.equal(before[k], after[k]) for k in before)
