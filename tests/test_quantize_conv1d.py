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

from gaugenet import symmetries
from gaugenet.apply import quantize
from gaugenet.apply._activation_aware import activation_aware_scales
from gaugenet.apply._quantize import quantized_params, transposed_params
from gaugenet.apply._schemes import QuantScheme, round_weight
from gaugenet.apply._search import input_means, input_ranges, smoothing_scales
from gaugenet.groups import RescalingFactor, model_state
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


def _ln1_factor(model, x):
    """GPT-2's first LayerNorm → `c_attn` rescaling (the gain scales `c_attn`'s input rows)."""
    group = symmetries(model, x)
    found = [
        f
        for f in group.factors
        if isinstance(f, RescalingFactor) and any(t.param == "h.0.ln_1.weight" for t in f.terms)
    ]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.75])
def test_smoothing_reads_conv1d_inputs_on_their_axis(strength):
    """SmoothQuant's scales on a LayerNorm → `Conv1D` block move the share `s` of each input
    feature's range into that feature's weight row, as on `nn.Linear` (where it is a column):
    after them the input range is `(X_j W_j)^(1−s)` and the row's `(X_j W_j)^s`. Before, the
    input statistics were taken over the sequence axis and the columns looked for on axis
    1, so every scale was 1 on GPT-2."""
    model, x = _gpt2()
    with torch.no_grad():  # two busy features, as in a trained transformer's stream
        model.h[0].ln_1.weight[[3, 11]] *= 30
    names, tr = quantized_params(model), transposed_params(model)
    name = "h.0.attn.c_attn.weight"
    f = _ln1_factor(model, x)
    act = input_ranges(model, x, names)
    assert act[name].shape == (16,)  # features, not positions (6)
    state = dict(model_state(model))
    (alpha,) = smoothing_scales([f], state, act, strength=strength, transposed=tr)
    assert float(alpha.log().abs().max()) > 1.0  # it moves the busy features
    moved = f.apply(state, alpha)
    model2, _ = _gpt2()
    model2.load_state_dict(moved)
    with torch.no_grad():
        y, y2 = model(**x).last_hidden_state, model2(**x).last_hidden_state
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-12)
    x1, w1 = act[name], state[name].abs().amax(1)
    x2, w2 = input_ranges(model2, x, names)[name], moved[name].abs().amax(1)
    prod = torch.log(x1 * w1)
    torch.testing.assert_close(torch.log(x2), (1 - strength) * prod, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.log(w2), strength * prod, rtol=0, atol=1e-10)
    # negative: read as an (out, in) weight, the rows are the outputs and nothing matches
    (wrong,) = smoothing_scales([f], state, act, strength=strength)
    assert torch.equal(wrong, torch.ones_like(wrong))
    # AWQ's scales read the same axis: the busy features get the largest scales
    means = input_means(model, x, names)
    assert means[name].shape == (16,)
    aware = activation_aware_scales(f, state, means, 0.5, tr)
    busy = means[name].topk(2).indices
    assert set(busy.tolist()) == {3, 11}
    assert set(aware.topk(2).indices.tolist()) == {3, 11} or set(
        (1 / aware).topk(2).indices.tolist()
    ) == {3, 11}
