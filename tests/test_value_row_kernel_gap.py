"""The gap left in GPT-J (8), GPT-Neo (8) and StableLM (1), measured exactly: the kernel
of the LayerNorm read by bias-free value rows. `W_v[i] += a_i / γ` adds `a_i Σ β/γ` to value
`i` at every token; softmax weights sum to one, so each head's output moves by the same
constant, and `out_proj` turns it into the constant `(Σ β/γ) W_o a` on the residual stream.
GPT-J's MLP, read in parallel and summed there, takes it back in its output bias (any `a`: 8
directions), as GPT-Neo's `out_proj` does in its own bias; in StableLM nothing does, unless
`W_o a` lies along `1`, which the following LayerNorms remove (`a ∝ W_o⁻¹ 1`: 1 direction).
The group does not hold them: the LayerNorm offset turns these value rows on the right
(`groups/_offset.py`), which scales a kernel on the same rows by `1 + 1ᵀc`. These tests pin
the gap down so that it is closed knowingly."""

from __future__ import annotations

import pytest
import torch

import gaugenet
from gaugenet.certify._functional_dimension import rank_of
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.certify._keywords import positional
from gaugenet.certify._orbit import orbit_projector
from gaugenet.discovery._float64 import keep_float64
from tiny_hf import unit_gain

T, E = 6, 8


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    return unit_gain(model.double().eval(), torch.Generator().manual_seed(0), bias=0.1)


def _ids(batch: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch * T,), generator=gen)
    ids[:vocab] = torch.arange(vocab)  # every token, several times
    return {"input_ids": ids[torch.randperm(ids.numel(), generator=gen)].reshape(batch, T)}


def _gptj():
    import transformers

    cfg = transformers.GPTJConfig(
        vocab_size=128, n_embd=E, n_layer=1, n_head=2, rotary_dim=2, n_positions=T, use_cache=False
    )
    return _randomize(transformers.GPTJModel(cfg)), _ids(96, 128)


def _stablelm():
    import transformers

    cfg = transformers.StableLmConfig(
        vocab_size=24,
        hidden_size=E,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=T,
        partial_rotary_factor=0.5,
        use_cache=False,
    )
    return _randomize(transformers.StableLmForCausalLM(cfg)), _ids(40, 24)


def _gptneo():
    import transformers

    cfg = transformers.GPTNeoConfig(
        vocab_size=24,
        hidden_size=E,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        max_position_embeddings=T,
        use_cache=False,
    )
    return _randomize(transformers.GPTNeoModel(cfg)), _ids(40, 24)


def _value_kernel(model, names, sizes, *, ln, value, out, bias) -> torch.Tensor:
    """`(n, k)`: the directions `W_v[i] += a_i / γ` (with `bias −= (Σ β/γ) W_o a` when
    `bias` is given, every `a = e_i`; else the one `a = W_o⁻¹ 1`)."""
    p = dict(model.named_parameters())
    u = 1 / p[f"{ln}.weight"].detach()
    c = float((p[f"{ln}.bias"].detach() * u).sum())
    w_o = p[out].detach()
    start = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    a = (
        torch.eye(E, dtype=torch.float64)
        if bias
        else torch.linalg.solve(w_o, torch.ones(E, 1, dtype=w_o.dtype))
    )
    x = torch.zeros(sum(sizes), a.shape[1], dtype=torch.float64)
    rows = start[value] + torch.arange(E * E)
    x[rows] = (a[:, None, :] * u[None, :, None]).reshape(E * E, -1)
    if bias:
        x[start[bias] : start[bias] + E] = -c * w_o @ a
    return x


CASES = {
    "gptj": (
        _gptj,
        dict(
            ln="h.0.ln_1",
            value="h.0.attn.v_proj.weight",
            out="h.0.attn.out_proj.weight",
            bias="h.0.mlp.fc_out.bias",
        ),
        8,
    ),
    # sequential block: the attention's own output bias takes the constant back
    "gptneo": (
        _gptneo,
        dict(
            ln="h.0.ln_1",
            value="h.0.attn.attention.v_proj.weight",
            out="h.0.attn.attention.out_proj.weight",
            bias="h.0.attn.attention.out_proj.bias",
        ),
        8,
    ),
    "stablelm": (
        _stablelm,
        dict(
            ln="model.layers.0.input_layernorm",
            value="model.layers.0.self_attn.v_proj.weight",
            out="model.layers.0.self_attn.o_proj.weight",
            bias=None,
        ),
        1,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_gap_is_the_value_rows_kernel(case: str) -> None:
    build, where, missing = CASES[case]
    model, ids = build()
    group = gaugenet.symmetries(model, ids)
    fm_model, fm_in = positional(model, ids)
    with keep_float64():
        fm = flat_model(fm_model, fm_in)
        jac = jacobian_of(fm)
    n = sum(fm.sizes)
    rank = rank_of(jac, rtol=1e-9).rank
    assert n - rank - group.dim == missing
    extra = _value_kernel(model, fm.names, fm.sizes, **where)
    scale = float(jac.abs().max())
    assert float((jac @ extra).abs().max()) < 1e-10 * scale * float(extra.abs().max())
    orbit = orbit_projector(model, group).basis()
    both = torch.cat([orbit, extra / extra.norm(dim=0)], 1)
    assert int(torch.linalg.matrix_rank(both, rtol=1e-8)) == n - rank
    # negative: without the compensation (GPT-J) or along another `a` (StableLM), outputs move
    start = dict(zip(fm.names, torch.tensor([0, *fm.sizes]).cumsum(0).tolist()))
    wrong = extra.clone()
    if where["bias"]:
        wrong[start[where["bias"]] : start[where["bias"]] + E] = 0
    else:
        rows = start[where["value"]] + torch.arange(E * E)
        wrong[rows] = wrong[rows].reshape(E, E, 1).flip(0).reshape(E * E, 1)
    assert float((jac @ wrong).abs().max()) > 1e-6 * scale
