"""`torch.addmm` / `torch.mm` in a model that `torch.fx` traces (GPT-2's `Conv1D` in an
`nn.Sequential`, or a hand-written layer): fx records the torch functions, not the aten ops
the rules read, and discovery found no factor at all (certify: 10 unexplained directions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet

F64 = torch.float64


class _Products(nn.Module):
    """`relu(addmm(b1, x, W1))`, then `mm(h, W2)`: no shape check, so fx traces it."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(6, 10, generator=g, dtype=F64))
        self.b1 = nn.Parameter(torch.randn(10, generator=g, dtype=F64))
        self.w2 = nn.Parameter(torch.randn(10, 5, generator=g, dtype=F64))

    def forward(self, x):
        return torch.mm(torch.relu(torch.addmm(self.b1, x, self.w1)), self.w2)


class _Scaled(_Products):
    """`addmm` with `beta`: not a plain linear layer's call; left to the general rules."""

    def forward(self, x):
        return torch.mm(torch.relu(torch.addmm(self.b1, x, self.w1, beta=2.0)), self.w2)


def _conv1d_mlp():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    return nn.Sequential(
        pytorch_utils.Conv1D(10, 6), nn.ReLU(), pytorch_utils.Conv1D(5, 10)
    ).double()


@pytest.mark.parametrize("build", [_Products, _conv1d_mlp], ids=["functions", "conv1d"])
def test_fx_traced_products_get_their_rescalings(build):
    model = build()
    x = torch.randn(64, 6, dtype=F64)
    group = gaugenet.symmetries(model, x)
    assert group.dim == 10
    report = gaugenet.certify(model, x)
    assert report.unexplained == 0
    g = group.sample(torch.Generator().manual_seed(1))
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    # negative: the same scales on the inputs of the first layer instead change the output
    wrong = group.act(model, g)
    with torch.no_grad():
        p = dict(wrong.named_parameters())["w1" if build is _Products else "0.weight"]
        p.mul_(torch.linspace(0.5, 2.0, p.shape[0], dtype=F64)[:, None])
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3


def test_products_with_beta_are_not_read_as_linear_layers():
    model = _Scaled()
    x = torch.randn(64, 6, dtype=F64)
    group = gaugenet.symmetries(model, x)
    g = group.sample(torch.Generator().manual_seed(1))
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-12
