"""A float64 model that computes part of its work in float32 (an RMSNorm variance after
`.to(torch.float32)`, as Hugging Face's norms do): `certify` keeps those casts in float64
for every measurement, so float32 rounding does not pass for broken symmetries or extra
rank; a cast that changes the function (to half precision) is left as it is."""

from __future__ import annotations

import copy

import torch
from torch import nn

import gaugenet
from gaugenet.certify import Verdict


class _Norm32(nn.Module):
    """`lin2(w ⊙ relu(lin1 x))` with the hidden units rounded to float32 before the gain
    (which promotes them back to float64), as a mixed-precision layer does, or with
    `half=True` to float16."""

    def __init__(self, half: bool = False) -> None:
        super().__init__()
        self.half = half
        self.lin1 = nn.Linear(4, 6)
        self.w = nn.Parameter(1 + 0.3 * torch.randn(6))
        self.lin2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin1(x))
        low = torch.float16 if self.half else torch.float32
        return self.lin2(self.w * h.to(low))  # promoted back to the gain's dtype


def _setup(half: bool = False):
    torch.manual_seed(0)
    model = _Norm32(half).double().eval()
    x = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


def test_float32_casts_are_kept_in_float64() -> None:
    model, x = _setup()
    group = gaugenet.symmetries(model, x)
    rep = gaugenet.certify(model, x, group=group)
    assert rep.verdict is Verdict.COMPLETE and rep.unexplained == 0, rep
    assert rep.symmetry_dim == 12  # per hidden unit: its ReLU scale and the gain's scale
    assert rep.worst_residual < 1e-13 and rep.act_error < 1e-12
    assert any(n.startswith("float64 model: its casts") for n in rep.notes)


def test_float32_rounding_was_mistaken_for_breaks() -> None:
    """Negative: the same measurements with the float32 rounding left in (what `certify`
    did before) push the tangent residuals past the tolerance."""
    from gaugenet.certify._checks import FactorChecks, check_tangents, sparse_jvp
    from gaugenet.certify._jacobian import flat_model

    model, x = _setup()
    group = gaugenet.symmetries(model, x)
    fm = flat_model(model, x)
    checks = FactorChecks()
    check_tangents(fm, group, sparse_jvp(fm), 1.0, 1e-9, checks, torch.Generator(), k=4)
    assert max(checks.residuals.values()) > 1e-9


def test_a_cast_that_changes_the_function_is_left_alone() -> None:
    model, x = _setup(half=True)
    rep = gaugenet.certify(model, x, group=gaugenet.symmetries(model, x), method="checks")
    assert not any(n.startswith("float64 model: its casts") for n in rep.notes)


class _CastGain(nn.Module):
    """`lin2((w.to(float32) * relu(lin1 x).to(float32)).to(float64))`: the gain read through
    a cast method, as `torch.fx` records it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 6)
        self.w = nn.Parameter(1 + 0.3 * torch.randn(6))
        self.lin2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin1(x))
        return self.lin2((self.w.to(torch.float32) * h.to(torch.float32)).to(h.dtype))


def test_a_gain_read_through_a_cast_is_a_gain() -> None:
    """Before, `.to()` fixed every label (0 found) and then the cast gain was taken for an
    unscaled tensor (6 found, the gain's scales missing); both casts now pass through."""
    torch.manual_seed(0)
    model = _CastGain().double().eval()
    x = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    group = gaugenet.symmetries(model, x)
    assert group.dim == 12
    rep = gaugenet.certify(model, x, group=group)
    assert rep.verdict is Verdict.COMPLETE and rep.unexplained == 0, rep
    # negative: scaling the gain alone (without lin2's columns) changes the outputs
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.w.mul_(1.5)
    assert gaugenet.invariance_error(model, moved, x) > 1e-2
