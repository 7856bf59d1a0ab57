"""Biases before InstanceNorm and GroupNorm: the mean subtraction removes their shifts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet

F64 = torch.float64


def _cnn(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3)
    ).to(F64).eval()  # fmt: skip


X = torch.randn(6, 2, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("norm", "shifts"),
    [(nn.InstanceNorm2d(4, affine=True), 4), (nn.GroupNorm(2, 4), 2), (nn.GroupNorm(1, 4), 1)],
    ids=["instance", "group-2", "group-1"],
)
def test_bias_shift_before_per_sample_normalization(norm: nn.Module, shifts: int) -> None:
    model = _cnn(norm)
    group = gaugenet.symmetries(model, X)
    shift = [f for f in group.factors if f.name == "shift:0"]
    assert len(shift) == 1 and shift[0].dim == shifts
    moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))
    assert float((moved[0].bias - model[0].bias).detach().abs().max()) > 1e-2  # it moved
    assert gaugenet.invariance_error(model, moved, X) < 1e-12
    canon = gaugenet.canonicalize(model, group=group)
    b = canon[0].bias.reshape(shifts, -1).mean(1)
    assert float(b.abs().max()) < 1e-12  # canonical gauge: zero (group-mean) bias
    assert gaugenet.invariance_error(model, canon, X) < 1e-12


def test_group_shift_must_be_equal_over_the_group() -> None:
    """Negative: shifting the channels of one GroupNorm group by different amounts changes
    the group's variance, so the outputs."""
    model = _cnn(nn.GroupNorm(2, 4))
    other = _cnn(nn.GroupNorm(2, 4))
    with torch.no_grad():
        other[0].bias += torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=F64)
    assert gaugenet.invariance_error(model, other, X) > 1e-3


def test_eval_instance_norm_with_running_stats_has_no_shift() -> None:
    model = _cnn(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)).eval()
    group = gaugenet.symmetries(model, X)
    assert not [f for f in group.factors if f.name == "shift:0"]
