"""Range balance on weights stored `(in, out)` (`transformers`' `Conv1D`, as in GPT-2).

The closed-form balance reads each quantized tensor's ranges per output channel of its
quantizer. For a `Conv1D` weight those channels are the columns; reading them as rows (the
inputs) gave the balance the wrong ranges per channel, so GPT-2's closed-form candidates
were computed from the wrong statistics (kept only where the objective drops, so the
function never changed, only the quality)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.apply._quantize import quantized_params, transposed_params
from gaugenet.apply._ranges import balance, factor_ranges
from gaugenet.groups import RescalingFactor

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")


def _pair(seed: int = 0):
    """The same ReLU MLP twice: with `nn.Linear` and with `Conv1D` (weights transposed);
    weights with a few large entries so that rows and columns have different ranges."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(6, 10), (10, 5)]
    lin = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 5)).double()
    conv = nn.Sequential(
        pytorch_utils.Conv1D(10, 6), nn.ReLU(), pytorch_utils.Conv1D(5, 10)
    ).double()
    with torch.no_grad():
        for i, (n_in, n_out) in zip((0, 2), sizes):
            w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
            w *= torch.exp(2 * torch.randn(n_out, 1, generator=g, dtype=torch.float64))
            b = torch.randn(n_out, generator=g, dtype=torch.float64)
            lin[i].weight.copy_(w), lin[i].bias.copy_(b)
            conv[i].weight.copy_(w.T), conv[i].bias.copy_(b)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    return lin, conv, x


def _hidden_scales(model, x) -> RescalingFactor:
    group = gaugenet.symmetries(model, x)
    (f,) = [f for f in group.factors if isinstance(f, RescalingFactor)]
    assert f.n == 10
    return f


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_conv1d_ranges_equal_the_linear_ones(per_channel, normalize):
    lin, conv, x = _pair()
    assert torch.allclose(lin(x), conv(x), rtol=1e-13, atol=1e-13)
    fl, fc = _hidden_scales(lin, x), _hidden_scales(conv, x)
    sl = {k: v.double() for k, v in lin.state_dict().items()}
    sc = {k: v.double() for k, v in conv.state_dict().items()}
    ql, qc, tc = set(quantized_params(lin)), set(quantized_params(conv)), transposed_params(conv)
    assert tc == {"0.weight", "2.weight"} and qc == tc
    up_l, down_l = factor_ranges(fl, sl, ql, per_channel, normalize)
    up_c, down_c = factor_ranges(fc, sc, qc, per_channel, normalize, tc)
    # the channel order may differ between the two discoveries: compare per unit of the
    # hidden layer, through each factor's action on its first weight
    order_l = _unit_order(fl, sl, "0.weight", axis=0)
    order_c = _unit_order(fc, sc, "0.weight", axis=1)
    for a, b in ((up_l, up_c), (down_l, down_c)):
        assert torch.allclose(a[order_l], b[order_c], rtol=1e-14, atol=0)
    alpha_l = balance(up_l, down_l)[order_l]
    alpha_c = balance(up_c, down_c)[order_c]
    assert torch.allclose(alpha_l, alpha_c, rtol=1e-14, atol=0)
    assert (alpha_l - 1).abs().max() > 1e-2  # the balance moves something


def test_rows_are_not_the_channels_of_conv1d():
    """Negative: without `transposed`, per-channel ranges of the `Conv1D` weights are read
    along the stored rows and differ from the right ones."""
    lin, conv, x = _pair()
    fc = _hidden_scales(conv, x)
    sc = {k: v.double() for k, v in conv.state_dict().items()}
    q, t = set(quantized_params(conv)), transposed_params(conv)
    right = torch.cat(factor_ranges(fc, sc, q, True, True, t))
    wrong = torch.cat(factor_ranges(fc, sc, q, True, True))
    assert float((right - wrong).abs().max()) > 0.1


def _unit_order(f: RescalingFactor, state, weight: str, axis: int) -> torch.Tensor:
    """Channel `k` of `f` -> the hidden unit it scales (which row, or column, of `weight`)."""
    alpha = torch.arange(2, f.n + 2, dtype=torch.float64)
    moved = f.apply(state, alpha)[weight] / state[weight]
    per_unit = moved.mean(1 - axis)  # (10,) ratios: unit u scaled by alpha[k(u)]
    return torch.argsort(torch.argsort(per_unit))  # rank of unit u = k(u) as alpha is sorted
