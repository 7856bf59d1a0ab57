"""Gated MLPs `down(act(gate(x)) * up(x))`: the product of two computed tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugenet

F64 = torch.float64


class Gated(nn.Module):
    def __init__(self, act, d: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.act = act
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def _model(act) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(40, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    return Gated(act).to(F64), x


@pytest.mark.parametrize("act", [F.silu, F.gelu], ids=["SwiGLU", "GeGLU"])
def test_gated_mlp_rescales_the_linear_branch_completely(act) -> None:
    model, x = _model(act)
    group = gaugenet.symmetries(model, x)
    assert group.dim == 6  # one scale per hidden unit, on up's rows and down's columns
    moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete" and report.unexplained == 0
    # negative: the same scales on the gate's rows instead change the outputs
    wrong = Gated(act).to(F64)
    wrong.load_state_dict(model.state_dict())
    alpha = torch.exp(torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        wrong.gate.weight.mul_(alpha[:, None])
        wrong.down.weight.div_(alpha)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-2


def test_reglu_keeps_a_sound_subset_and_names_the_product() -> None:
    """With ReLU both factors rescale, and the product's scale is their product: one scale
    per entry holds only one of them, so the gate's scales are fixed and named."""
    model, x = _model(F.relu)
    group = gaugenet.symmetries(model, x)
    assert group.dim == 6
    assert any("product of two rescaled tensors" in b.reason for b in group.breakers)
    moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "incomplete" and report.unexplained == 6  # the gate's scales
