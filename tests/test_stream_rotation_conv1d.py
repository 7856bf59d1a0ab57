"""The residual-stream rotation when the stream's writers and readers are `addmm` maps with
`(in, out)` weights (GPT-2's `Conv1D`): a writer's weight turns by `W ↦ W Q` (its
columns), a reader's by `W ↦ diag(γ)⁻¹ Qᵀ diag(γ) W` (its rows), next to `nn.Linear`
readers; the group is then complete (`dim = n − rank J`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.groups import OrthogonalFactor
from gaugenet.groups._orthogonal import ConjugatedRows, RotateColumns

F64 = torch.float64
D, V, T = 6, 10, 5


class Conv1D(nn.Module):
    """GPT-2's linear layer: `x W + b` with `W` `(in, out)`, as `addmm` on the flattened
    tokens."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(n_out))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.reshape(*x.shape[:-1], -1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
        self.c_attn, self.c_proj = Conv1D(D, 3 * D), Conv1D(D, D)
        self.c_fc, self.mlp_proj = Conv1D(D, 2 * D), Conv1D(2 * D, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (
            z.reshape(b, t, 2, D // 2).transpose(1, 2)
            for z in self.c_attn(self.ln1(x)).split(D, -1)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).reshape(b, t, D))
        return x + self.mlp_proj(torch.relu(self.c_fc(self.ln2(x))))


class Decoder(nn.Module):
    """Token ids `(batch, T)` → logits: token and position tables, a pre-LN block of
    `Conv1D` layers, a final LayerNorm and an untied head (`Conv1D` or `nn.Linear`)."""

    def __init__(self, linear_head: bool) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.Sequential(Block())
        self.lnf = nn.LayerNorm(D, bias=False)
        self.head = nn.Linear(D, V, bias=False) if linear_head else Conv1D(D, V)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(self.lnf(self.blocks(x)))


def _model(linear_head: bool = False) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = Decoder(linear_head).to(F64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, V, (60, T), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.mark.parametrize("linear_head", [False, True])
def test_conv1d_stream_rotation_is_found_exact_and_complete(linear_head: bool) -> None:
    model, ids = _model(linear_head)
    group = gaugenet.symmetries(model, ids)
    (rot,) = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    assert rot.fixes_ones and rot.dim == (D - 1) * (D - 2) // 2
    turned = {t.param for t in rot.terms}
    assert {"blocks.0.c_proj.weight", "blocks.0.mlp_proj.weight"} <= turned  # writers
    assert any(
        isinstance(t, ConjugatedRows) and t.param == "blocks.0.c_attn.weight" for t in rot.terms
    )
    report = gaugenet.certify(model, ids, group=group)
    assert report.verdict == "complete", report  # dim = n − rank J
    assert report.worst_residual < 1e-12
    # without the rotation, exactly its dimension of ker J is left unexplained
    rest = tuple(f for f in group.factors if f is not rot)
    without = gaugenet.GaugeGroup(rest, group.breakers, group.param_names)
    assert gaugenet.certify(model, ids, group=without).unexplained == rot.dim
    for seed in (2, 3):
        moved = group.act(model, group.sample(torch.Generator().manual_seed(seed)))
        assert gaugenet.invariance_error(model, moved, ids) < 1e-12
        assert not torch.allclose(moved.tok.weight, model.tok.weight)


def _apply(model: nn.Module, terms: tuple, q: Tensor) -> nn.Module:
    new = {k: v.clone() for k, v in model.state_dict().items()}
    for t in terms:
        t(new, q)
    out = _model()[0]
    out.load_state_dict(new)
    return out


def test_transformations_that_must_change_the_outputs_do() -> None:
    """The rotation with an element that moves `1` (the LayerNorms see it), and with the
    writers' `(in, d)` weights turned along the wrong axis (`Qᵀ W` on the inputs): each
    changes the outputs."""
    model, ids = _model()
    group = gaugenet.symmetries(model, ids)
    (rot,) = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    assert gaugenet.invariance_error(model, _apply(model, rot.terms, q), ids) > 1e-2
    good = rot.sample(torch.Generator().manual_seed(5))
    assert gaugenet.invariance_error(model, _apply(model, rot.terms, good), ids) < 1e-12

    def wrong_axis(new: dict, r: Tensor, p: str = "blocks.0.c_proj.weight") -> None:
        new[p] = r.T @ new[p]

    terms = tuple(t for t in rot.terms if t != RotateColumns("blocks.0.c_proj.weight"))
    assert len(terms) == len(rot.terms) - 1
    assert gaugenet.invariance_error(model, _apply(model, (*terms, wrong_axis), good), ids) > 1e-2


def test_a_tied_head_gets_no_rotation_and_no_internal_error() -> None:
    """The head reads the stream with the token table's own tensor (tied, under another
    name): the table would turn by `Q` and the head by `Qᵀ`, which disagree, so no rotation
    is claimed, and none is caught by the self-check either."""
    model, ids = _model(linear_head=True)
    model.head.weight = model.tok.weight
    group = gaugenet.symmetries(model, ids)
    assert not [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))
    assert gaugenet.invariance_error(model, moved, ids) < 1e-12
