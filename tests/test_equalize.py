"""Equalization: a gauge element chosen for rounding, with the function unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.apply import equalize, equalizing_element, quantize_weights, sqnr_db
from gaugenet.apply import weight_quantization_error as wqe
from gaugenet.apply._models import load_crepe_tiny
from gaugenet.apply._ranges import balance
from gaugenet.groups import GaugeGroup, GLFactor, MatTerm, RescalingFactor, Scale, model_state


def _bn_cnn(gen: torch.Generator, dtype=torch.float64) -> nn.Sequential:
    """A BN CNN whose channels have very different scales (as training leaves them).

    The layers' initial weights come from torch's global generator: it is seeded here, so
    that the model (and the measured gain) does not depend on which tests ran before."""
    torch.manual_seed(2)
    m = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 12), nn.ReLU(), nn.Linear(12, 5),
    ).to(dtype).eval()  # fmt: skip
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.rand(c, generator=gen, dtype=dtype) - 0.5)
                mod.running_var.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.2)
                mod.weight.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.3)
                mod.bias.copy_(torch.rand(c, generator=gen, dtype=dtype) - 0.5)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                w = mod.weight
                s = torch.exp(1.5 * torch.randn(w.shape[0], generator=gen, dtype=dtype))
                w.mul_(s.reshape(-1, *([1] * (w.dim() - 1))))
    return m


def test_balance_closed_form():
    up = torch.tensor([0.5, 0.1, 0.0, 0.2, 0.0], dtype=torch.float64)
    down = torch.tensor([0.5, 0.4, 0.3, 0.0, 0.0], dtype=torch.float64)
    a = balance(up, down)
    assert torch.allclose(a, torch.tensor([1.0, 2.0, 0.3, 5.0, 1.0], dtype=torch.float64))
    both = slice(0, 2)
    assert torch.allclose(up[both] * a[both], down[both] / a[both])  # equal ranges after


def test_equalize_bn_cnn_keeps_function_and_helps_4bit(gen):
    m = _bn_cnn(gen)
    x = torch.rand(64, 1, 8, 8, generator=gen, dtype=torch.float64)
    e = equalize(m, x[:4], bits=4)
    assert gaugenet.invariance_error(m, e, x) <= 1e-10
    names = ["0.weight", "3.weight", "8.weight", "10.weight"]
    assert wqe(model_state(e), names, 4) < 0.8 * wqe(model_state(m), names, 4)
    y = m(x).detach()
    gain = sqnr_db(y, quantize_weights(e, 4)(x).detach()) - sqnr_db(
        y, quantize_weights(m, 4)(x).detach()
    )
    assert gain > 3.0
    # every rescaling factor found was used, the BN ones included
    group, g = equalizing_element(m, x[:4], bits=4)
    moved = {k for k, v in g.items() if v.dtype.is_floating_point and (v - 1).abs().max() > 1e-3}
    assert {"scale:0", "scale:1:out", "scale:3", "scale:4:out", "scale:8"} <= moved


def test_equalize_float32_tolerance(gen):
    m = _bn_cnn(gen, torch.float32)
    x = torch.rand(32, 1, 8, 8, generator=gen)
    e = equalize(m, x[:4], bits=8, granularity="per-channel")
    assert gaugenet.invariance_error(m, e, x, dtype=torch.float32) <= 1e-5


def test_equalize_refuses_a_non_symmetry(gen):
    """Negative: a 'factor' that rescales one layer alone is no symmetry; the check catches it."""
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    idx = torch.arange(6).reshape(6, 1)
    fake = RescalingFactor("scale:0-only", 6, terms=(Scale("0.weight", idx, 1),))
    group = GaugeGroup((fake,))
    with torch.no_grad():
        m[0].weight.mul_(torch.linspace(0.01, 10, 6, dtype=torch.float64).reshape(6, 1))
    with pytest.raises(gaugenet.GaugeError, match="changed the outputs"):
        equalize(m, x, bits=4, group=group)


def test_gl_factor_diagonal_and_hadamard(gen):
    """Two heads of V→O (`y = W_O W_V x`), `GL(4)` per head: an outlier row in W_V is spread
    by the chosen element, function kept."""
    m = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5)).double()
    with torch.no_grad():
        m[0].weight[2] *= 30.0  # one outlier channel in head 0
    f = GLFactor("gl:vo", d=4, b=2, terms=(
        MatTerm("0.weight", 0, 0, "inv"), MatTerm("0.bias", 0, 0, "inv"),
        MatTerm("1.weight", 1, 0, "T"),
    ))  # fmt: skip
    group = GaugeGroup((f,))
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    _, g = equalizing_element(m, x, bits=4, group=group)
    e = equalize(m, x, bits=4, group=group)
    assert gaugenet.invariance_error(m, e, x) <= 1e-10
    assert wqe(model_state(e), ["0.weight", "1.weight"], 4) < wqe(
        model_state(m), ["0.weight", "1.weight"], 4
    )
    assert g["gl:vo"].shape == (2, 4, 4)
    assert (g["gl:vo"] - torch.eye(4, dtype=torch.float64)).abs().max() > 1e-2
    _, g_diag = equalizing_element(m, x, bits=4, group=group, rotations=False)
    off = g_diag["gl:vo"] - torch.diag_embed(torch.diagonal(g_diag["gl:vo"], dim1=1, dim2=2))
    assert off.abs().max() == 0  # without rotations the choice is diagonal


def test_bad_objective_raises(gen):
    m = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(gaugenet.GaugeError, match="objective"):
        equalize(m, torch.zeros(1, 2), bits=4, objective="mse-magic")


def test_crepe_real_weights_4bit_gain():
    m = load_crepe_tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1024, generator=g)
    e = equalize(m, x[:2], bits=4, sweeps=4)
    assert gaugenet.invariance_error(m, e, x, dtype=torch.float32) <= 1e-5
    with torch.no_grad():
        y = m(x)
        gain = sqnr_db(y, quantize_weights(e, 4)(x)) - sqnr_db(y, quantize_weights(m, 4)(x))
    assert gain > 3.0
