"""LayerNorms written as primitive operations are seen as the `nn.LayerNorm` they compute,
on the numbers alone (`_numeric_norms.py`), in both captures: the same group as with
`nn.LayerNorm` (gain scales, the `β` shift, the kernel on the writer), complete against
`n − rank J`. Negatives: norms that differ from a LayerNorm (no centering, a `1 + w` gain,
the unbiased variance, another `eps`) are not taken for one, and the LayerNorm's kernel
changes the outputs of a model whose norm does not center."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.certify import Verdict
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.discovery._numeric_norms import numeric_layernorm
from gaugenet.discovery._trace import trace
from gaugenet.groups import model_state
from tiny_hf import DECODER, tiny_hf

F64 = torch.float64


class Norm(nn.Module):
    """A norm written out: `kind` `"layer"` (LayerNorm), `"rms"` (no centering), `"one_plus"`
    (gain `1 + w`), `"unbiased"` (variance over `d − 1`)."""

    def __init__(self, d: int, kind: str = "layer", bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.randn(d, dtype=F64))
        self.bias = nn.Parameter(torch.randn(d, dtype=F64)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        c = x if self.kind == "rms" else x - x.mean(-1, keepdim=True)
        n = x.shape[-1] - 1 if self.kind == "unbiased" else x.shape[-1]
        y = c * torch.rsqrt(c.pow(2).sum(-1, keepdim=True) / n + self.eps)
        y = y * (1 + self.weight if self.kind == "one_plus" else self.weight)
        return y if self.bias is None else y + self.bias


class Net(nn.Module):
    """`b(norm(x))`: the norm reads the input (a linear map before it would make a rotation
    of the centred features a symmetry, which discovery does not find for a single
    LayerNorm), and `b` reads the norm."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.n, self.b = norm, nn.Linear(6, 3, dtype=F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.n(x))


def _net(kind: str = "layer", bias: bool = True, module: bool = False) -> Net:
    torch.manual_seed(0)
    norm = nn.LayerNorm(6, bias=bias, dtype=F64) if module else Norm(6, kind, bias)
    net = Net(norm)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


X = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=F64)


@pytest.mark.parametrize("bias", [True, False])
def test_written_out_layernorm_gets_the_layernorm_group(bias: bool) -> None:
    model, ref = _net(bias=bias), _net(bias=bias, module=True)
    group, want = gaugenet.symmetries(model, X), gaugenet.symmetries(ref, X)
    assert [(f.kind, f.dim) for f in group.factors] == [(f.kind, f.dim) for f in want.factors]
    # by hand: gains 6, the β shift into b's bias 6 (with β), the kernel of b's rows 3
    assert group.dim == (15 if bias else 9)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    report = gaugenet.certify(model, X, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
    out, gen = model(X), torch.Generator().manual_seed(1)
    for _ in range(3):
        assert relative_error(group.act(model, group.sample(gen))(X), out) < 1e-12


@pytest.mark.parametrize(
    "kind,eps", [("rms", 1e-5), ("one_plus", 1e-5), ("unbiased", 1e-5), ("layer", 1e-5)]
)
def test_other_norms_are_not_taken_for_a_layernorm(kind: str, eps: float) -> None:
    norm = Norm(6, kind)
    nodes = list(trace(Net(norm), 1).graph.nodes)
    found = numeric_layernorm(norm, nodes)
    assert (found is not None) == (kind == "layer")
    if found is not None:
        assert found.eps == eps and found.weight is norm.weight and found.bias is norm.bias
    # a LayerNorm whose `eps` is not among the numbers of the graph given
    assert numeric_layernorm(Norm(6, "layer", eps=1e-3), nodes) is None


def test_the_kernel_of_a_layernorm_moves_a_norm_that_does_not_center() -> None:
    """Negative: the LayerNorm kernel (`b`'s rows moved along `1 / γ`, which the centred
    features do not see) keeps the written-out LayerNorm's outputs and changes those of the
    same model with an RMSNorm."""
    layer, rms = _net("layer"), _net("rms")
    group = gaugenet.symmetries(layer, X)
    kernel = next(f for f in group.factors if f.name.startswith("ln_kernel"))
    c = kernel.sample(torch.Generator().manual_seed(2), F64, 1.0)
    for model, moves in ((layer, False), (rms, True)):
        moved = copy.deepcopy(model)
        moved.load_state_dict(kernel.apply(model_state(model), c))
        err = relative_error(moved(X), model(X))
        assert (err > 1e-3) if moves else (err < 1e-12)
    assert gaugenet.symmetries(rms, X).dim < group.dim


def test_cohere_layernorm_written_out_is_complete() -> None:
    """`CohereModel` (parallel block, LayerNorms without bias written as primitive
    operations, in float32 inside a float64 model; captured by `torch.export`): the
    embedding rows' and writers' constants, the readers' offsets and the gains are all
    found: complete against `n − rank J`."""
    model, x = tiny_hf("CohereModel", "CohereConfig", batch=96, **{**DECODER, "vocab_size": 128})
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    with keep_float64():
        report = gaugenet.certify(model, x, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
    assert group.dim == 272
