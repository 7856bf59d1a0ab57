"""Discovery on the meta device: the same factors as on CPU, marked unchecked, and checkable
later on weights (`check_on`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR, check_on

F64 = torch.float64
transformers = pytest.importorskip("transformers")


def _rows(group: gaugenet.GaugeGroup) -> list[tuple]:
    return [(f.name, f.kind, f.dim, f.modules) for f in group.factors]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten())


@pytest.mark.parametrize("build, shape", [(_mlp, (5, 4)), (_cnn, (2, 2, 7, 7))], ids=["mlp", "cnn"])
def test_meta_matches_cpu_and_checks_later(build, shape, gen) -> None:
    torch.manual_seed(0)
    cpu = build().double()
    x = torch.randn(*shape, generator=gen, dtype=F64)
    with torch.device("meta"):
        meta = build().double()
    g_cpu = gaugenet.symmetries(cpu, x)
    g_meta = gaugenet.symmetries(meta, x)
    assert _rows(g_meta) == _rows(g_cpu) and g_cpu.dim > 0
    assert g_cpu.checked and not g_meta.checked
    assert "unchecked" in repr(g_meta) and "meta device" in g_meta.unchecked
    checked = check_on(g_meta, cpu, x)
    assert checked.checked and _rows(checked) == _rows(g_cpu)
    g = checked.sample(gen)
    assert gaugenet.invariance_error(cpu, checked.act(cpu, g), x) < 1e-12


def test_check_on_drops_a_factor_that_fails_on_weights(gen) -> None:
    """The check is numeric: a group found on meta for a ReLU network, without its model
    signature, checked on a tanh network (not positively homogeneous) loses its rescaling
    (named among the breakers as an internal error); with the signature it is refused."""
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    group = gaugenet.symmetries(meta, torch.zeros(2, 4))
    x = torch.randn(5, 4, generator=gen, dtype=F64)
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    tanh = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    assert [f.kind for f in check_on(group, relu, x).factors] == ["rescaling", "permutation"]
    with pytest.raises(gaugenet.GaugeError, match="another model"):
        check_on(group, tanh, x)
    loose = check_on(dataclasses.replace(group, signature=None), tanh, x)
    assert [f.kind for f in loose.factors] == ["permutation"]
    assert any(b.reason.startswith(INTERNAL_ERROR) for b in loose.breakers)


def test_check_on_refuses_meta_weights_and_meta_inputs() -> None:
    with torch.device("meta"):
        meta = _mlp().double()
    group = gaugenet.symmetries(meta, torch.zeros(2, 4))
    with pytest.raises(gaugenet.GaugeError, match="meta device"):
        check_on(group, meta, torch.zeros(2, 4))
    with pytest.raises(gaugenet.GaugeError, match="meta device"):
        check_on(group, _mlp().double(), torch.zeros(2, 4, device="meta"))
    assert check_on(group, _mlp().double()).checked  # the group's own (CPU) inputs


def _llama_config() -> object:
    return transformers.LlamaConfig(
        vocab_size=24,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8,
        use_cache=False,
    )


_ATTENTION = {"qk", "vo", "kv_groups", "heads[0]", "heads[1]"}


@pytest.mark.slow
def test_meta_llama_matches_cpu(gen) -> None:
    cfg = _llama_config()
    torch.manual_seed(0)
    cpu = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg).double().eval()
    x = {"input_ids": torch.randint(0, 24, (2, 5), generator=gen)}
    g_cpu, g_meta = gaugenet.symmetries(cpu, x), gaugenet.symmetries(meta, x)
    # attention's maps (rotary, head layout) are measured on values: on meta it is named
    # among the breakers, and everything else is found as on the CPU
    attention = {f.name for f in g_cpu.factors if f.name.rpartition(".")[2] in _ATTENTION}
    assert attention and _rows(g_meta) == [r for r in _rows(g_cpu) if r[0] not in attention]
    assert any("meta device" in b.reason for b in g_meta.breakers)
    assert not g_meta.checked
    checked = check_on(g_meta, cpu, x)
    assert checked.checked and _rows(checked) == _rows(g_meta)
