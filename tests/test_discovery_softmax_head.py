"""A linear layer read only by a softmax (or log-softmax) over its outputs: the softmax
ignores what the layer adds along `1` (`W += 1 aᵀ`, `b += t 1`), a classifier head's
redundancy, found from the graph and certified against the Jacobian."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import gaugenet
from gaugenet.discovery._float64 import keep_float64


class _Head(nn.Module):
    def __init__(self, log: bool = False, dim: int = -1, also: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 8)
        self.out = nn.Linear(8, 3)
        self.log, self.dim, self.also = log, dim, also

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.out(torch.relu(self.hidden(x)))
        p = F.log_softmax(z, dim=self.dim) if self.log else torch.softmax(z, dim=self.dim)
        return p + z if self.also else p  # `also`: the logits are read besides the softmax


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return _Head(**kw).double()


X = torch.randn(64, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _center(group) -> list:
    return [f for f in group.factors if f.name == "center:out"]


def test_softmax_head_is_centered_and_complete() -> None:
    for log in (False, True):
        model = _model(log=log)
        group = gaugenet.symmetries(model, X)
        (f,) = _center(group)
        assert f.dim == 8 + 1
        report = gaugenet.certify(model, X, group=group, method="exact")
        # 8 ReLU unit scales and the head's 9 directions along 1: nothing else
        assert report.unexplained == 0 and report.symmetry_dim == 17, report
        with keep_float64():
            g = group.sample(torch.Generator().manual_seed(2), scale=0.5)
            assert gaugenet.invariance_error(model, group.act(model, g), X) < 1e-12
        # negative: the same vector added to one row of the head only
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            wrong.out.weight[0] += 0.5
        assert gaugenet.invariance_error(model, wrong, X) > 1e-3


def test_not_over_the_outputs_or_read_elsewhere() -> None:
    """A softmax over the batch axis, or logits read besides the softmax: no such factor,
    and adding along 1 (`a·h` to every logit) does change the outputs there."""
    for kw in ({"dim": 0}, {"also": True}):
        model = _model(**kw)
        assert not _center(gaugenet.symmetries(model, X))
        moved = copy.deepcopy(model)
        with torch.no_grad():  # every logit moved by the same `a·h`: along 1
            moved.out.weight[:, 0] += 0.5
        assert gaugenet.invariance_error(model, moved, X) > 1e-3
