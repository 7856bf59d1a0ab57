"""Self-attention written as the paper writes it, `softmax(x W_Q (x W_K)ᵀ / √d) x W_V W_O`.

Two gaps hid the paper's central symmetry on the plainest code: a projection that feeds the
core with nothing in between (no head reshape) was refused ("the path to the attention does
not give one tensor"), and projections on raw parameters (`x @ W_q`) were not linear maps
to the analysis. Both now give the per-head `GL(d_h)` of queries-keys and of values-output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet

F64 = torch.float64
D, DH = 8, 4


class _Raw(nn.Module):
    """One head on raw parameters, weights `(in, out)` as in the paper: `x W`."""

    def __init__(self, layers: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = layers
        for i in range(layers):
            for n, shape in (("q", (D, DH)), ("k", (D, DH)), ("v", (D, DH)), ("o", (DH, D))):
                w = torch.randn(*shape, generator=g, dtype=F64) / 2
                setattr(self, f"w{n}{i}", nn.Parameter(w))

    def forward(self, x):
        for i in range(self.layers):
            q, k, v = (x @ getattr(self, f"w{n}{i}") for n in "qkv")
            a = torch.softmax(q @ k.transpose(-1, -2) / DH**0.5, -1)
            x = x + (a @ v) @ getattr(self, f"wo{i}")
        return x


class _Linears(nn.Module):
    """One head on `nn.Linear`s, no reshape between projections and the core."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(D, DH, bias=False, dtype=F64) for _ in range(3))
        self.o = nn.Linear(DH, D, bias=False, dtype=F64)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / DH**0.5, -1)
        return x + self.o(a @ self.v(x))


def _x(batch: int = 64) -> torch.Tensor:
    return torch.randn(batch, 5, D, dtype=F64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("build", [_Raw, _Linears], ids=["raw", "linears"])
def test_one_head_has_both_gls(build):
    model, x = build(), _x()
    group = gaugenet.symmetries(model, x)
    gls = sorted((f.name.rsplit(".", 1)[-1], f.dim) for f in group.factors if f.kind == "gl")
    assert gls == [("qk", DH * DH), ("vo", DH * DH)]
    report = gaugenet.certify(model, x)
    assert report.verdict == "complete" and report.unexplained == 0
    g = group.sample(torch.Generator().manual_seed(2))
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-12


def test_the_gl_is_not_any_change_of_the_projections():
    """Negative: `W_q ↦ W_q G` without `W_k ↦ W_k G⁻ᵀ` changes the scores."""
    model, x = _Raw(), _x()
    G = torch.eye(DH, dtype=F64) + 0.3 * torch.randn(
        DH, DH, dtype=F64, generator=torch.Generator().manual_seed(3)
    )
    right, wrong = _Raw(), _Raw()
    with torch.no_grad():
        right.wq0.copy_(model.wq0 @ G)
        right.wk0.copy_(model.wk0 @ torch.linalg.inv(G).T)
        wrong.wq0.copy_(model.wq0 @ G)
    assert gaugenet.invariance_error(model, right, x) < 1e-12
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3


def test_two_layers_on_raw_parameters_name_their_factors_apart():
    """Two cores on root parameters: each core's factors are named by its query weight
    (`wq0.qk`, `wq1.qk`), not by an empty module path shared by both."""
    model, x = _Raw(layers=2), _x()
    group = gaugenet.symmetries(model, x)
    names = {f.name for f in group.factors if f.kind == "gl"}
    assert names == {"wq0.qk", "wq0.vo", "wq1.qk", "wq1.vo"}
    assert gaugenet.certify(model, x).unexplained == 0
    g = group.sample(torch.Generator().manual_seed(4))
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-12


class _Eq35(nn.Module):
    """Eq. (35) as printed: the attention's output is the model's (no `W_o` reads it)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wq, self.wk, self.wv = (
            nn.Parameter(torch.randn(D, DH, generator=g, dtype=F64)) for _ in range(3)
        )

    def forward(self, x):
        scores = (x @ self.wq) @ (x @ self.wk).transpose(-1, -2)
        return torch.softmax(scores, -1) @ (x @ self.wv)


def test_query_key_gl_without_an_output_projection():
    """The core's output reaches no projection: the query-key `GL` alone is derived (the
    value-output part is named as not analyzed) and nothing is left unexplained."""
    model, x = _Eq35(), _x()
    group = gaugenet.symmetries(model, x)
    assert [(f.name, f.dim) for f in group.factors] == [("wq.qk", DH * DH)]
    assert any("value-output part" in str(b) for b in group.breakers)
    assert gaugenet.certify(model, x).unexplained == 0
    g = group.sample(torch.Generator().manual_seed(5))
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-12


class _Relu(nn.Module):
    """ReLU attention (eq. (35) with a positively homogeneous `φ`), `heads` heads from one
    fused projection with biases, or one head on separate `nn.Linear`s."""

    def __init__(self, heads: int = 0, masked: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.masked = heads, masked
        if heads:
            self.qkv = nn.Linear(D, 3 * D, dtype=F64)
            self.o = nn.Linear(D, D, dtype=F64)
        else:
            self.q, self.k, self.v = (nn.Linear(D, DH, bias=False, dtype=F64) for _ in range(3))
            self.o = nn.Linear(DH, D, bias=False, dtype=F64)

    def forward(self, x):
        if not self.heads:
            s = self.q(x) @ self.k(x).transpose(-1, -2) / 2.0
            if self.masked:  # a bias added to the scores: relu(α s + m) ≠ α relu(s + m)
                s = s + torch.linspace(-1.0, 1.0, x.shape[1], dtype=F64)
            return x + self.o(torch.relu(s) @ self.v(x))
        B, T, _ = x.shape
        q, k, v = (
            t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(D, -1)
        )
        a = torch.relu(q @ k.transpose(-1, -2))
        return self.o((a @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("heads", [0, 2], ids=["one head", "two heads, biases"])
def test_relu_attention_has_the_alpha_of_eq37(heads):
    model, x = _Relu(heads), _x()
    group = gaugenet.symmetries(model, x)
    kinds = {f.name.rsplit(".", 1)[-1]: f.dim for f in group.factors}
    h, dh = max(heads, 1), (D // heads if heads else DH)
    assert kinds["qk"] == kinds["vo"] == h * dh * dh
    assert kinds["alpha"] == h
    assert "key_shift" not in kinds and "value_shift" not in kinds  # rows do not sum to one
    assert gaugenet.certify(model, x).unexplained == 0
    g = group.sample(torch.Generator().manual_seed(6))
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-12


def test_relu_scores_with_an_added_bias_have_no_alpha():
    """Negative: a bias added to the scores does not scale with them, so no `α` is offered
    (the two `GL`s, which keep the scores, are); scaling `W_k` by 2 and `W_v` by 1/2
    changes the output."""
    model, x = _Relu(masked=True), _x()
    group = gaugenet.symmetries(model, x)
    assert sorted(f.name for f in group.factors) == ["q.heads", "q.qk", "q.vo"]
    moved = _Relu(masked=True)
    with torch.no_grad():
        moved.k.weight.mul_(2.0)
        moved.v.weight.div_(2.0)
    assert gaugenet.invariance_error(model, moved, x) > 1e-3
    assert gaugenet.certify(model, x).unexplained == 0
