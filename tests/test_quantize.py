"""Round-to-nearest weight quantization and the figures of merit measured with it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.apply import (
    cosine_similarity,
    quantize_dynamic_int8,
    quantize_tensor,
    quantize_weights,
    quantized_params,
    sqnr_db,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_tensor_per_tensor_grid(bits, gen):
    w = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    q = quantize_tensor(w, bits)
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().max() / qmax
    k = q / step
    assert torch.allclose(k, k.round(), atol=1e-9)  # integers times one step
    assert k.abs().max() <= qmax + 1e-9
    assert (q - w).abs().max() <= step / 2 + 1e-12  # round to nearest
    assert len(torch.unique(k.round())) <= 2 * qmax + 1


def test_quantize_tensor_per_channel_uses_row_steps(gen):
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64) * torch.tensor(
        [[1e-3], [1], [10], [1e2]]
    )
    q = quantize_tensor(w, 4, "per-channel")
    steps = w.abs().amax(1, keepdim=True) / 7
    assert ((q - w).abs() <= steps / 2 + 1e-12).all()
    # per-tensor rounds the small row to zero entirely: a measurable difference
    assert quantize_tensor(w, 4)[0].abs().max() == 0
    assert q[0].abs().max() > 0


def test_quantize_weights_touches_only_layer_weights(gen):
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    q = quantize_weights(m, 4)
    assert quantized_params(m) == ["0.weight", "3.weight"]
    for k, v in q.state_dict().items():
        if k in ("0.weight", "3.weight"):
            assert not torch.equal(v, before[k])
        else:
            assert torch.equal(v, before[k]), k
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # original kept


def test_quantization_error_shrinks_with_bits(gen):
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    x = torch.randn(32, 8, generator=gen, dtype=torch.float64)
    y = m(x).detach()
    s = [sqnr_db(y, quantize_weights(m, b)(x).detach()) for b in (4, 8, 12)]
    assert s[0] < s[1] < s[2]
    assert s[1] - s[0] > 15  # about 6 dB per bit
    assert s[0] < 40  # 4 bits changes the output measurably


def test_bad_arguments_raise():
    m = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(gaugenet.GaugeError, match="bits"):
        quantize_weights(m, 1)
    with pytest.raises(gaugenet.GaugeError, match="granularity"):
        quantize_weights(m, 4, "per-row")
    with pytest.raises(gaugenet.GaugeError, match="no Linear or Conv"):
        quantize_weights(nn.Sequential(nn.ReLU()), 4)


def test_sqnr_and_cosine_values():
    r = torch.ones(10, dtype=torch.float64)
    assert sqnr_db(r, 1.1 * r) == pytest.approx(20.0)
    assert sqnr_db(r, r) == math.inf
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert cosine_similarity(a, torch.tensor([[2.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)


def test_torch_ao_int8_dynamic(gen):
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(64, 16, generator=gen)
    y = m(x).detach()
    q = quantize_dynamic_int8(m)
    s = sqnr_db(y, q(x))
    assert 20 < s < 80  # close to float, but integer arithmetic does change it
    with pytest.raises(gaugenet.GaugeError, match="does not apply"):
        quantize_dynamic_int8(nn.Sequential(nn.Conv1d(1, 1, 3)))
