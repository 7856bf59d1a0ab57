"""The table cause makes only a table's first readers distinct: a layer that reads a
table-fed LayerNorm keeps the norm's guarantees, so a true symmetry of it that discovery
misses is reported as unexplained, not passed off as the table's."""

from __future__ import annotations

import torch
from torch import nn

import gaugenet


class _TableNorm(nn.Module):
    """Token embedding → LayerNorm → linear: every layer sees one row per token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids)))


def _setup():
    torch.manual_seed(0)
    model = _TableNorm().double().eval()
    with torch.no_grad():
        model.norm.weight.add_(0.3 * torch.randn(5, dtype=torch.float64))
        model.norm.bias.add_(0.3 * torch.randn(5, dtype=torch.float64))
    ids = torch.arange(6).repeat(8).reshape(8, 6)
    return model, ids, gaugenet.symmetries(model, ids)


def test_missing_kernel_is_unexplained_not_table() -> None:
    model, ids, group = _setup()
    kernel = [f for f in group.factors if f.name.startswith("ln_kernel:")]
    assert [f.dim for f in kernel] == [3]  # the head's rows along 1/γ, bias compensating
    full = gaugenet.certify(model, ids, group=group, method="exact")
    assert not full.wrong and full.unexplained > 0  # 6 distinct rows: a table
    assert all("unexplained" not in c for c in full.causes), full.causes
    # negative: the kernel left out of the group shows up as 3 unexplained directions
    less = gaugenet.GaugeGroup(
        tuple(f for f in group.factors if f not in kernel), group.breakers, group.param_names
    )
    report = gaugenet.certify(model, ids, group=less, method="exact")
    assert report.unexplained == full.unexplained + 3
    (rest,) = [c for c in report.causes if "unexplained" in c]
    assert rest.startswith("3 unexplained directions"), report.causes
