"""Units that stay on one piece of their activation: a ReLU unit never positive is dead,
a PReLU or LeakyReLU unit never positive is linear with its negative slope, and the cause
says which."""

from __future__ import annotations

import torch
from torch import nn

from gaugenet.certify._causes import relu_causes


def _mlp(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = -1.0  # unit 1: negative on every input
    return model


def test_negative_units_named_by_their_activation() -> None:
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (relu,) = [c for c in relu_causes(_mlp(nn.ReLU()), x) if "[1]" in c]
    assert "1 unit(s) dead" in relu
    for act in (nn.PReLU(4).double(), nn.LeakyReLU(0.1)):
        (line,) = [c for c in relu_causes(_mlp(act), x) if "[1]" in c]
        assert "on the negative slope only" in line and "dead" not in line
