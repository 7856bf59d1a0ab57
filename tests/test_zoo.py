"""`gaugenet.zoo`: listing, fingerprints, the per-checkpoint work and its rows (in process)."""

from __future__ import annotations

import copy

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gaugenet import GaugeError, canonicalize, invariance_error, symmetries
from gaugenet.zoo import (
    SCHEMA,
    Canonicalize,
    Certify,
    Equalize,
    Inspect,
    content_hash,
    fingerprint,
    list_checkpoints,
    process,
)
from gaugenet.zoo._arch import resolve_arch
from gaugenet.zoo._store import ResultStore
from gaugenet.zoo._worker import Job, clear_cache

ARCH = """
import torch
from torch import nn
def net():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
def net64():
    return net().double()
def other():
    return nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3))
"""


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _weights(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Zero-mean unit-gain weights and small biases: every ReLU unit is active on part of a
    standard normal batch and inactive on the rest (no dead units, distinct unit norms)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in _net().state_dict().items():
        fan_in = v.shape[-1] if v.dim() == 2 else 1
        scale = fan_in**-0.5 if v.dim() == 2 else 0.1
        out[k] = (torch.randn(v.shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return out


@pytest.fixture
def zoo(tmp_path):
    (tmp_path / "arch.py").write_text(ARCH)
    d = tmp_path / "zoo"
    d.mkdir()
    for i in range(3):
        save_file(_weights(i), str(d / f"m{i}.safetensors"))
    torch.save(_weights(3), d / "m3.pt")
    return d, resolve_arch(f"{tmp_path / 'arch.py'}:net64")


def _job(path, arch, task, out) -> Job:
    return Job(str(path), arch, task, str(out))


def _load(state) -> nn.Module:
    m = _net().double()
    m.load_state_dict(state)
    return m


def test_listing(tmp_path, zoo) -> None:
    d, _ = zoo
    hf = d / "sub" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x")
    (d / "notes.txt").write_text("not a checkpoint")
    (d / "out").mkdir()
    save_file(_weights(9), str(d / "out" / "written.safetensors"))
    found = list_checkpoints(d, exclude=d / "out")
    names = [p.split("/")[-1] for p in found]
    # a Hugging Face folder is one checkpoint; the excluded results folder is not read
    assert names == ["m0.safetensors", "m1.safetensors", "m2.safetensors", "m3.pt", "hf"]
    assert list_checkpoints(str(d / "m*.safetensors")) == found[:3]
    assert len(list_checkpoints(d)) == 6
    with pytest.raises(GaugeError, match="no checkpoints"):
        list_checkpoints(str(d / "*.onnx"))
    assert content_hash(d / "m0.safetensors") != content_hash(d / "m1.safetensors")
    assert len(content_hash(hf)) == 64


def test_fingerprint_ignores_values_not_computation() -> None:
    a, b = _net(), _net()
    b.load_state_dict(_weights(5, torch.float32))
    assert fingerprint(a) == fingerprint(b)
    # the same parameter shapes, another activation: another computation
    c = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    assert fingerprint(c) != fingerprint(a)
    assert fingerprint(copy.deepcopy(a).double()) != fingerprint(a)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return self.l(x).relu() + x

    class Plain(Residual):
        def forward(self, x):
            return self.l(x).relu()

    # equal modules and parameters, different forward: told apart by the traced graph
    assert fingerprint(Residual()) != fingerprint(Plain())


def test_canonicalize_row_matches_the_library(tmp_path, zoo) -> None:
    d, arch = zoo
    clear_cache()
    rows = [process(_job(p, arch, Canonicalize(), tmp_path / "out")) for p in list_checkpoints(d)]
    assert [r["discovery_cached"] for r in rows] == [False, True, True, True]
    assert len({r["arch_fingerprint"] for r in rows}) == 1
    x = torch.randn(64, 4, dtype=torch.float64)
    for r in rows:
        assert r["verdict"] == "ok" and r["error"] is None, r
        assert r["symmetry_dim"] == 11 and r["n_params"] == 4 * 6 + 6 + 6 * 5 + 5 + 5 * 3 + 3
        assert r["drift"] < 1e-12
        src = r["path"]
        model = _load(load_file(src) if src.endswith("safetensors") else torch.load(src))
        # the written weights are what the library gives with a fresh discovery (the
        # cached group of another checkpoint changes nothing) ...
        expected = canonicalize(model, example_inputs=x, group=symmetries(model, x))
        written = load_file(r["output"])
        for k, v in expected.state_dict().items():
            torch.testing.assert_close(written[k], v, rtol=0, atol=1e-12)
        # ... the same function, and weights that did move
        assert invariance_error(model, _load(written), x) < 1e-12
        assert (written["0.weight"] - model[0].weight).abs().max() > 1e-3
        assert r["output"].startswith(str(tmp_path / "out"))
    assert pq.read_schema(ResultStore(tmp_path / "out", "canonicalize").parts.iterdir().__next__())
    assert set(SCHEMA.names) >= {"path", "content_hash", "arch_fingerprint", "verdict", "error"}


def test_bad_checkpoints_become_error_rows(tmp_path, zoo) -> None:
    d, arch = zoo
    (d / "garbage.safetensors").write_bytes(b"not a safetensors file")
    torch.save({"0.weight": torch.zeros(2, 2)}, d / "wrong.pt")
    torch.save({"obj": nn.Linear(2, 2)}, d / "pickled.pt")
    out = tmp_path / "out"
    expect = {"garbage": "not a readable safetensors", "wrong": "does not match", "pickled": ""}
    for name, words in expect.items():
        path = next(d.glob(f"{name}.*"))
        row = process(_job(path, arch, Inspect(), out))
        assert row["verdict"] == "error" and words in row["error"], row
        assert row["arch_fingerprint"] is None and row["content_hash"] is not None
    untraceable = process(_job(d / "m0.safetensors", None, Inspect(), out))
    assert untraceable["verdict"] == "error" and "--arch" in untraceable["error"]
    assert len(ResultStore(out, "inspect").finished()) == 4  # every error row is recorded


def test_certify_and_equalize(tmp_path, zoo) -> None:
    d, arch = zoo
    out = tmp_path / "out"
    # seed 8 draws a network without hidden redundancy on normal inputs
    save_file(_weights(8), str(d / "good.safetensors"))
    row = process(_job(d / "good.safetensors", arch, Certify(), out))
    assert row["verdict"] == "certified", row
    assert row["unexplained"] == 0 and row["functional_dim"] == row["n_params"] - 11
    # a dead unit (never active) is a redundancy no symmetry explains
    dead = _weights(8)
    dead["0.weight"][2] = 0.0
    dead["0.bias"][2] = -1.0
    save_file(dead, str(d / "dead.safetensors"))
    row = process(_job(d / "dead.safetensors", arch, Certify(), out))
    assert row["verdict"] == "unexplained" and row["unexplained"] > 0, row
    eq = process(_job(d / "m1.safetensors", arch, Equalize(bits=4), out))
    assert eq["verdict"] == "ok" and eq["drift"] < 1e-9, eq
    assert eq["sqnr_after_db"] > eq["sqnr_before_db"] - 1e-9


def test_store_compacts_and_keeps_rows(tmp_path, zoo) -> None:
    d, arch = zoo
    out = tmp_path / "out"
    for p in list_checkpoints(d)[:2]:
        process(_job(p, arch, Inspect(), out))
    store = ResultStore(out, "inspect")
    before = store.finished()
    table = store.compact()
    assert table.num_rows == 2 and not list(store.parts.glob("*.parquet"))
    assert store.finished() == before  # the compacted table holds what the parts held
    process(_job(list_checkpoints(d)[2], arch, Inspect(), out))
    assert len(store.finished()) == 3 and store.compact().num_rows == 3


def test_unknown_arch_and_task() -> None:
    from gaugenet.zoo._tasks import as_task

    with pytest.raises(GaugeError, match="built-in"):
        resolve_arch("no_such_arch")
    with pytest.raises(GaugeError, match="does not exist"):
        resolve_arch("/no/such/file.py:net")
    assert resolve_arch("digits_mlp") == "gaugenet.apply._models:digits_mlp"
    with pytest.raises(GaugeError, match="unknown zoo task"):
        as_task("prune")
    assert Canonicalize("unit_in").signature == "canonicalize(gauge=unit_in)"
    for bad in (
        lambda: Canonicalize("sorted"),
        lambda: Equalize(bits=1),
        lambda: Equalize(granularity="per-row"),
        lambda: Certify(method="svd"),
    ):
        with pytest.raises(GaugeError):
            bad()


def test_hugging_face_folder(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "zoo" / "bert")
    (path,) = list_checkpoints(tmp_path / "zoo")
    row = process(_job(path, None, Canonicalize(), tmp_path / "out"))
    assert row["verdict"] == "ok" and row["drift"] < 1e-5, row
    assert row["n_params"] == sum(v.numel() for v in load_file(row["output"]).values())
    moved = load_file(row["output"])["encoder.layer.0.attention.self.query.weight"]
    original = transformers.BertModel.from_pretrained(path).state_dict()
    assert (moved - original["encoder.layer.0.attention.self.query.weight"]).abs().max() > 1e-3
