"""A LayerNorm written as `F.layer_norm` inside a module of the model's own (OLMo's
non-affine norm) is analyzed as the `nn.LayerNorm` it computes: the residual stream it
reads rotates by `O(d − 1)`, its readers get the mean-subtraction kernel, and the group
explains every direction of `ker J`; through `torch.fx` and through `torch.export`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugenet
from gaugenet._errors import UnsupportedModelError
from gaugenet.discovery._trace import trace
from gaugenet.groups import OrthogonalFactor

F64 = torch.float64
D, V, T = 6, 10, 5


class Norm(nn.Module):
    """`F.layer_norm` over the last axis, with the module's own `weight` (if `affine`)."""

    def __init__(self, affine: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(D).uniform_(0.5, 1.5)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (D,), self.weight, None, 1e-5)


class Attention(nn.Module):
    """Causal softmax attention, 2 heads (the mask an additive buffer, so that `torch.fx`
    traces it)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.o = nn.Linear(D, D)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        self.register_buffer("mask", torch.zeros(T, T).masked_fill(~causal, -1e9))

    def forward(self, h: Tensor) -> Tensor:
        split = lambda z: z.reshape(-1, T, 2, D // 2).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        s = q @ k.transpose(-1, -2) / math.sqrt(D // 2) + self.mask
        return self.o((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(-1, T, D))


class Block(nn.Module):
    def __init__(self, affine: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = Norm(affine), Norm(affine)
        self.attn = Attention()
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(torch.relu(self.up(self.ln2(x))))


class Decoder(nn.Module):
    """Token ids `(batch, T)` → logits `(batch, T, V)`: token and position tables, two
    pre-norm blocks, a final norm, an untied head. `traceable=False` adds a check on the
    input's shape that `torch.fx` cannot trace (the capture then goes through `torch.export`)."""

    def __init__(self, affine: bool = False, traceable: bool = True) -> None:
        super().__init__()
        self.traceable = traceable
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.register_buffer("positions", torch.arange(T))
        self.blocks = nn.Sequential(Block(affine), Block(affine))
        self.lnf = Norm(affine)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        if not self.traceable and ids.shape[1] > T:  # a branch on a shape: export only
            raise ValueError("sequence longer than the position table")
        x = self.tok(ids) + self.pos(self.positions)
        return self.head(self.lnf(self.blocks(x)))


def _model(affine: bool = False, traceable: bool = True) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = Decoder(affine, traceable).to(F64)
    ids = torch.randint(0, V, (60, T), generator=torch.Generator().manual_seed(1))
    return model, ids


def _tok(model: nn.Module) -> Tensor:
    return next(p for n, p in model.named_parameters() if n.endswith("tok.weight"))


CASES = [
    {"affine": False, "traceable": True},
    {"affine": False, "traceable": False},
    {"affine": True, "traceable": True},
    {"affine": True, "traceable": False},
]


@pytest.mark.parametrize("kw", CASES, ids=str)
def test_functional_layernorm_gives_the_stream_rotation_and_a_complete_group(kw) -> None:
    model, ids = _model(**kw)
    if kw["traceable"]:
        trace(model, 1)
    else:
        with pytest.raises(UnsupportedModelError):
            trace(model, 1)
    group = gaugenet.symmetries(model, ids)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())  # model unchanged
    (rot,) = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    assert rot.fixes_ones and rot.dim == (D - 1) * (D - 2) // 2
    report = gaugenet.certify(model, ids, group=group)
    assert report.verdict == "complete", report  # dim = n − rank J
    assert report.worst_residual < 1e-12
    for seed in (2, 3):
        moved = group.act(model, group.sample(torch.Generator().manual_seed(seed)))
        assert gaugenet.invariance_error(model, moved, ids) < 1e-12
        assert not torch.allclose(_tok(moved), _tok(model))


def test_a_rotation_that_moves_ones_changes_the_outputs() -> None:
    """The rotation's terms with an element that does not keep `1`: the functional
    LayerNorm's mean subtraction sees it."""
    model, ids = _model()
    group = gaugenet.symmetries(model, ids)
    (rot,) = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(4), dtype=F64))
    new = {k: v.clone() for k, v in model.state_dict().items()}
    for t in rot.terms:
        t(new, q)
    wrong = _model()[0]
    wrong.load_state_dict(new)
    assert gaugenet.invariance_error(model, wrong, ids) > 1e-2


class OtherNorm(Norm):
    """`F.layer_norm` times a second parameter of the module's own: not a LayerNorm's
    parameters, so the module is not read as one."""

    def __init__(self) -> None:
        super().__init__(False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, D))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale


def test_a_module_with_other_parameters_is_not_read_as_a_layernorm() -> None:
    """Its gain `scale` is not conjugated into the readers by any LayerNorm rule: no
    rotation is claimed through it, and the group stays exact."""
    model, ids = _model()
    model.lnf = OtherNorm().to(F64)
    group = gaugenet.symmetries(model, ids)
    assert not [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))
    assert gaugenet.invariance_error(model, moved, ids) < 1e-12
