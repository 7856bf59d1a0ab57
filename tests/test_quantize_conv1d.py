"""GPT-2's layers store their weights `(in, out)` (`transformers`' `Conv1D`, `x W + b`).

They were not among the quantized layers, so `quantize` left every block of GPT-2 in float
(`GPT2Model` was refused as having no layer to quantize, `GPT2LMHeadModel` had only its
head rounded). They are rounded now as the `nn.Linear` holding the transposed weight is:
per output channel (a column), per group of inputs (down a column), with per-token input
rounding for activation schemes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gaugenet.apply import quantize
from gaugenet.apply._quantize import quantized_params, transposed_params
from gaugenet.apply._schemes import QuantScheme, round_weight
from tiny_hf import tiny_hf

GPT2 = dict(vocab_size=24, n_embd=16, n_layer=1, n_head=2, n_positions=6, use_cache=False)


def _gpt2():
    return tiny_hf("GPT2Model", "GPT2Config", **GPT2)


def _as_linear(conv) -> nn.Linear:
    lin = nn.Linear(*conv.weight.shape, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    return lin


@pytest.mark.parametrize("scheme", ["w4", "w4g8", "w4t"])
def test_conv1d_weights_rounded_as_their_transposes(scheme):
    model, _ = _gpt2()
    names = quantized_params(model)
    transposed = transposed_params(model)
    assert transposed and transposed <= set(names)
    assert "h.0.attn.c_attn.weight" in transposed  # (in, out) = (16, 48)
    q = quantize(model, scheme)
    for name in transposed:
        conv = model.get_submodule(name.rsplit(".", 1)[0])
        lin = quantize(_as_linear(conv), scheme)
        got = q.get_parameter(name).detach()
        assert torch.equal(got, lin.weight.detach().T)
        # on the grid: rounding again keeps it
        assert torch.equal(round_weight(got, QuantScheme.parse(scheme), True), got)


def test_rows_are_not_the_output_channels():
    """Negative: rounded along the stored rows (the inputs), the weights differ."""
    model, _ = _gpt2()
    name = "h.0.mlp.c_fc.weight"
    w = model.get_parameter(name).detach()
    sch = QuantScheme.parse("w4")
    right = quantize(model, sch).get_parameter(name).detach()
    wrong = round_weight(w, sch)  # per stored row
    assert float((right - wrong).abs().max()) > 1e-3 * float(w.abs().max())
    # per output channel: each column's largest entry sits on the grid's end
    step = w.abs().amax(0) / 7
    assert torch.allclose(right.abs().amax(0), 7 * step, rtol=1e-12, atol=0)


@torch.no_grad()
def test_activation_rounding_at_conv1d_inputs():
    model, x = _gpt2()
    y = model(**x).last_hidden_state
    w4 = quantize(model, "w4")(**x).last_hidden_state
    w4a8 = quantize(model, "w4a8")(**x).last_hidden_state
    w4a2 = quantize(model, "w4a2")(**x).last_hidden_state
    assert not torch.equal(w4, w4a8)  # the hooks act on the Conv1D inputs
    assert float((w4a2 - y).abs().max()) > float((w4a8 - y).abs().max())
