"""`a += b` on the fresh output of a linear layer (Falcon's parallel block: `mlp_output +=
attention_output`) is read as `a + b` under `torch.export` (`aten.add_`), so the symmetries
through the sum are found as for the out-of-place sum."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import gaugenet

F64 = torch.float64


class Parallel(nn.Module):
    """`head(relu(down(relu(up(x))) (+)= side(y)))`, the sum in place or not; a shape check
    that `torch.fx` cannot trace sends the capture through `torch.export`."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.up, self.down = nn.Linear(3, 5), nn.Linear(5, 4)
        self.side, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[-1] != 3:
            raise ValueError("expected 3 features")
        h = self.down(torch.relu(self.up(x)))
        if self.inplace:
            h += self.side(y)
        else:
            h = h + self.side(y)
        return self.head(torch.relu(h))


def _model(inplace: bool = True) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = (3 * torch.randn(200, 3, generator=g, dtype=F64) for _ in range(2))  # ReLUs switch
    return Parallel(inplace).to(F64), (x, y)


def test_inplace_sum_of_a_linear_output_gives_the_out_of_place_group() -> None:
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    assert not any("add_" in b.reason for b in group.breakers)
    plain, _ = _model(inplace=False)
    assert group.dim == gaugenet.symmetries(plain, x).dim
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete", report  # dim = n − rank J
    assert report.worst_residual < 1e-12
    for seed in (2, 3):
        moved = group.act(model, group.sample(torch.Generator().manual_seed(seed)))
        assert gaugenet.invariance_error(model, moved, x) < 1e-12
        assert not torch.allclose(moved.side.weight, model.side.weight)


def test_scaling_one_summand_alone_changes_the_outputs() -> None:
    """The sum's units rescale only when both summands (and their biases) do: scaling
    `down`'s rows alone, with `head` compensating, changes the outputs."""
    model, x = _model()
    wrong, _ = _model()
    s = torch.tensor([2.0, 0.5, 3.0, 1.5], dtype=F64)
    with torch.no_grad():
        wrong.down.weight.mul_(s[:, None])
        wrong.down.bias.mul_(s)
        wrong.head.weight.div_(s)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-2
    with torch.no_grad():  # with the other summand scaled too it is a symmetry
        wrong.side.weight.mul_(s[:, None])
        wrong.side.bias.mul_(s)
    assert gaugenet.invariance_error(model, wrong, x) < 1e-12
