"""The act check in float32: a random element whose float32 round-off exceeds `√ε` on
ill-conditioned outputs is confirmed on a float64 copy and reported as round-off, not as a
wrong factor; a factor that really changes the outputs stays wrong."""

from __future__ import annotations

import torch
from torch import nn

import gaugenet
from gaugenet.certify import Verdict
from gaugenet.certify._checks import act_tolerance
from gaugenet.groups import GaugeGroup, RescalingFactor, Scale


def _cancelling() -> tuple[nn.Module, torch.Tensor]:
    """A float32 ReLU net whose output `1e3 (h0 − h1)` cancels two nearly equal units of
    size about 1: every rounding of a weight of size 1e3 moves the output, of size about
    1e-2, by about `1e3 · 6e-8 / 1e-2 ≈ 6e-3` relative, far over float32's `√ε`."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))
    v = torch.tensor([0.7, -0.4, 0.5, 0.3])
    with torch.no_grad():
        net[0].weight.copy_(torch.stack([v, v + 1e-5 * torch.randn(4, generator=g)]))
        net[0].bias.fill_(3.0)  # both units on for the inputs below
        net[2].weight.copy_(torch.tensor([[1e3, -1e3]]))
        net[2].bias.zero_()
    x = 0.5 * torch.randn(64, 4, generator=g)
    return net, x


def test_float32_roundoff_is_not_wrong() -> None:
    net, x = _cancelling()
    group = gaugenet.symmetries(net, x)
    assert group.dim == 2  # one positive scale per hidden unit
    rep = gaugenet.certify(net, x, group=group, generator=torch.Generator().manual_seed(3))
    # the float32 act error is over its tolerance: without the float64 copy this was
    # reported as "the factors do not compose"
    assert rep.act_error > act_tolerance(torch.float32)
    assert rep.verdict is not Verdict.WRONG and not rep.wrong
    note = next(n for n in rep.notes if n.startswith("act check"))
    assert "round-off" in note and "float32" in note
    # the float64 figure in the note is at rounding level
    err64 = float(note.split("float64 copy by ")[1].split(" ")[0])
    assert err64 < 1e-10


def test_float32_wrong_factor_stays_wrong() -> None:
    """Negative check: unit 0's row and bias scaled without its outgoing weight. The
    float64 copy fails as well, so the factor is named."""
    net, x = _cancelling()
    group = gaugenet.symmetries(net, x)
    row = torch.tensor([0, 1]).reshape(2, 1)
    bad = RescalingFactor(
        "bad", 1, terms=(Scale("0.weight", row, 1), Scale("0.bias", row.reshape(2), 1))
    )
    broken = GaugeGroup((*group.factors, bad), group.breakers, group.param_names)
    rep = gaugenet.certify(net, x, group=broken, generator=torch.Generator().manual_seed(3))
    assert rep.verdict is Verdict.WRONG and "bad" in rep.wrong
    assert not any(n.startswith("act check") for n in rep.notes)
    assert rep.act_error > 1e-2
