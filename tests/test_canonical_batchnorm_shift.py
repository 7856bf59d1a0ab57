"""A residual block whose two branches end in eval-mode BatchNorm: the stream shift's gauge
zeroes one BatchNorm's `β`, which the rescalings then move (`β ↦ β + (γμ/s)(1/α − 1)`), so
the shift gauges and the balanced scales are imposed in turn until both hold; the canonical
form is then the same at every point of the orbit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugenet

torch.set_num_threads(1)


class _Net(nn.Module):
    """Stem (convolution, BatchNorm), one basic block with a projection shortcut, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, 2, 3, 1, 1, bias=False), nn.BatchNorm2d(2)
        self.c1, self.b1 = nn.Conv2d(2, 3, 3, 2, 1, bias=False), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 3, 3, 1, 1, bias=False), nn.BatchNorm2d(3)
        self.down = nn.Sequential(nn.Conv2d(2, 3, 1, 2, bias=False), nn.BatchNorm2d(3))
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        h = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        h = F.relu(h + self.down(x))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = _Net()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c))
                bn.running_var.copy_(0.5 + torch.rand(c))
                bn.weight.copy_(1 + 0.3 * torch.randn(c))
                bn.bias.copy_(0.3 * torch.randn(c))
    return m.double().eval()


def test_canonical_form_is_orbit_independent_with_a_batchnorm_shift() -> None:
    model = _model()
    x = torch.randn(40, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    group = gaugenet.symmetries(model, x)
    assert any(f.name.startswith("stream_shift:") for f in group.factors)
    canon = gaugenet.canonicalize(model, example_inputs=x, group=group)
    assert gaugenet.exact_invariance_error(model, canon, x) < 1e-9
    moved = group.act(model, group.sample(torch.Generator().manual_seed(1), scale=0.3))
    pairs = zip(moved.parameters(), model.parameters())
    assert max(float((a - b).detach().abs().max()) for a, b in pairs) > 1e-2
    again = gaugenet.canonicalize(moved, example_inputs=x, group=group)
    top = max(float(q.detach().abs().max()) for q in again.parameters())
    diff = max(
        float((p - q).detach().abs().max()) for p, q in zip(canon.parameters(), again.parameters())
    )
    assert diff / top < 1e-8
