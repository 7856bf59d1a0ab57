"""Biases only ever summed (`discovery/_summed_biases.py`): the shift moved between two linear
branches of a residual sum, checked on its own elements, against the Jacobian, with the
group's composition law, and refused where a branch is read elsewhere. (Convolutional
branches with BatchNorm are streams, `test_discovery_linear_streams.py`.)"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import gaugenet
from gaugenet.certify import functional_dimension
from gaugenet.discovery.rules.patterns import _Shortcut
from gaugenet.discovery.rules.recurrent import BiasDifferenceFactor
from gaugenet.groups import GaugeGroup

X = torch.randn(256, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _model() -> nn.Module:
    torch.manual_seed(1)
    return _Shortcut().double().eval()


def _moves(group: GaugeGroup) -> list[BiasDifferenceFactor]:
    return [f for f in group.factors if f.name.startswith("summed_bias:")]


def _err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_found_with_its_dimension_and_the_jacobian() -> None:
    model = _model()
    group = gaugenet.symmetries(model, X)
    (f,) = _moves(group)
    assert f.dim == 3 and set(f.params()) == {"l1.bias", "proj.bias"}
    fd = functional_dimension(model, (X,))
    assert fd.n_params - fd.rank == group.dim == 10


def test_elements_keep_the_outputs_float64_and_float32() -> None:
    model = _model()
    group = gaugenet.symmetries(model, X)
    (f,) = _moves(group)
    gen = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m, x = copy.deepcopy(model).to(dtype), X.to(dtype)
        v = 2 * torch.randn(3, generator=gen, dtype=torch.float64).to(dtype)
        moved = group.act(m, {f.name: v})
        with torch.no_grad():
            assert _err(moved(x), m(x)) < tol
            assert (moved.l1.bias - m.l1.bias).abs().max() > 0.1  # it did move


def test_one_bias_moved_alone_changes_the_outputs() -> None:
    model = _model()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.l1.bias.add_(0.5)  # half of the move: the sum changes
        assert _err(moved(X), model(X)) > 1e-3


def test_tangent_in_the_kernel_of_the_jacobian() -> None:
    model = _model()
    group = gaugenet.symmetries(model, X)
    (f,) = _moves(group)
    t = GaugeGroup((f,), (), group.param_names).tangent(model)
    jac = torch.func.jacrev(
        lambda th: torch.func.functional_call(
            model, dict(zip(group.param_names, _split(th, model))), (X,)
        ).reshape(-1)
    )(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert float((jac @ t.T).norm()) < 1e-10 * float(jac.norm())


def _split(th: Tensor, model: nn.Module) -> list[Tensor]:
    out, k = [], 0
    for p in model.parameters():
        out.append(th[k : k + p.numel()].reshape(p.shape))
        k += p.numel()
    return out


def test_composition_with_rescalings_and_permutations() -> None:
    """`act(act(m, g), h) == act(m, compose(g, h))`: the move is rescaled by the summed
    channels' scales (`scaled_by`) and re-indexed by their permutations."""
    model = _model()
    group = gaugenet.symmetries(model, X)
    (f,) = _moves(group)
    assert f.scaled_by
    gen = torch.Generator().manual_seed(2)
    g, h = group.sample(gen), group.sample(gen)
    a = group.act(group.act(model, g), h)
    b = group.act(model, group.compose(g, h))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10), name


class _Seen(_Shortcut):
    """The projection is also an output: its bias is seen."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.proj(x)
        return self.head(torch.relu(self.l1(torch.relu(self.l0(x))) + p)), p


def test_not_offered_when_a_branch_is_read_elsewhere() -> None:
    torch.manual_seed(1)
    model = _Seen().double().eval()
    assert not _moves(gaugenet.symmetries(model, X))


class _Parallel(nn.Module):
    """A parallel residual block on tokens `(batch, tokens, d)` (GPT-NeoX's layout): one
    LayerNorm read by an attention-like map and an MLP, both behind dropout, summed into the
    stream."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.drop1, self.drop2 = nn.Dropout(0.1), nn.Dropout(0.1)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        y = x + (self.drop1(self.attn(h)) + self.drop2(self.down(torch.relu(self.up(h)))))
        return self.head(torch.tanh(y))


def test_parallel_block_output_biases_on_the_features() -> None:
    """The two output biases of a parallel block, added on the last axis of a 3-D stream
    and seen through eval-mode dropout, trade one vector per feature; certify finds the
    group complete."""
    torch.manual_seed(0)
    model = _Parallel().double().eval()
    x = torch.randn(64, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    group = gaugenet.symmetries(model, x)
    (f,) = _moves(group)
    assert f.dim == 4 and set(f.params()) == {"attn.bias", "down.bias"}
    moved = group.act(model, {f.name: torch.linspace(-1, 1, 4, dtype=torch.float64)})
    assert gaugenet.invariance_error(model, moved, x) < 1e-13
    assert gaugenet.certify(model, x, group=group).verdict == "complete"
    # negative: in training mode the dropouts differ, and the move is not offered
    assert not _moves(gaugenet.symmetries(_Parallel().double().train(), x))
    # negative: one bias moved alone changes the outputs
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.attn.bias += 0.5
    assert _err(wrong(x), model(x)) > 1e-3
