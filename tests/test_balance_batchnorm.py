"""The balanced gauge of a network with eval-mode BatchNorm: the BatchNorm terms are not
convex in the log-scales, and the minimum must be found from every point of the orbit (the
Newton step falls back to the gradient where it would climb)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet._balance import balanced_scales
from gaugenet.groups import RescalingFactor, model_state

torch.set_num_threads(1)

X = torch.randn(16, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _net(seed: int) -> nn.Module:
    """Two convolutions with BatchNorm whose running means are large (a strong coupling)."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.copy_(2 * torch.randn(6))
            bn.running_var.copy_(0.2 + torch.rand(6))
            bn.weight.copy_(torch.randn(6))
            bn.bias.copy_(0.1 * torch.randn(6))
    return m.double().eval()


@pytest.mark.parametrize("seed", [0, 3])
def test_balanced_minimum_is_the_same_from_every_point_of_the_orbit(seed: int) -> None:
    model = _net(seed)
    group = gaugenet.symmetries(model, X)
    rescalings = [f for f in group.factors if isinstance(f, RescalingFactor)]
    assert rescalings
    params = {n for n, _ in model.named_parameters()}
    touched = {p for f in rescalings for p in f.params()} & params
    balanced = []
    for k in range(4):
        full = group.sample(torch.Generator().manual_seed(k), scale=1.0)
        el = {f.name: full[f.name] if f in rescalings else f.identity() for f in group.factors}
        state = {k: v.double() for k, v in model_state(group.act(model, el)).items()}
        balanced.append(group.act_state(state, balanced_scales(group, state, params)))
    norms = [sum(float((b[p] ** 2).sum()) for p in touched) for b in balanced]
    assert max(norms) - min(norms) < 1e-10 * max(norms)
    for b in balanced[1:]:
        for p in touched:
            assert float((b[p] - balanced[0][p]).abs().max()) < 1e-8
