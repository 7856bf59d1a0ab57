"""The attention gauge group (eq. 36-37, value-output GL, key shift, head permutations) on
`SelfAttention`, `nn.MultiheadAttention` and `nn.TransformerEncoderLayer`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gaugenet
from gaugenet.attention import (
    align_attention,
    attention_factors,
    canonicalize_attention,
    qk_matrices,
    self_attention_layout,
    vo_matrices,
)
from gaugenet.groups import GaugeGroup, model_state
from gaugenet.nets import SelfAttention

F64 = torch.float64
#: GL samples with condition numbers up to 1e3 (`GLFactor.sample` uses `log_cond = 4 scale`)
SCALE = math.log(1e3) / 4


def _make(kind: str, gen: torch.Generator) -> tuple[nn.Module, tuple]:
    x = torch.randn(3, 5, 8, generator=gen, dtype=F64)
    if kind.startswith("sa-"):
        act = kind[3:].removesuffix("-nobias")
        m = SelfAttention(8, 2, activation=act, bias="nobias" not in kind, dtype=F64, generator=gen)
        return m, (x,)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    if kind == "mha":
        return nn.MultiheadAttention(8, 2, dtype=F64), (x, x, x)
    if kind == "mha-kdim":
        xk = torch.randn(3, 6, 5, generator=gen, dtype=F64)
        return nn.MultiheadAttention(8, 2, kdim=5, vdim=5, batch_first=True, dtype=F64), (x, xk, xk)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=F64)
    if kind == "enc":
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), (x,)
    return layer.eval(), (x,)


KINDS = [
    "sa-relu",
    "sa-identity",
    "sa-softmax",
    "sa-softmax-nobias",
    "mha",
    "mha-kdim",
    "tel",
    "enc",
]


@pytest.mark.parametrize("kind", KINDS)
def test_invariance_50_elements(kind, gen):
    m, x = _make(kind, gen)
    group = gaugenet.symmetries(m)
    errs = [
        gaugenet.invariance_error(m, group.act(m, group.sample(gen, scale=SCALE)), x)
        for _ in range(50)
    ]
    assert max(errs) < 1e-11, max(errs)


@pytest.mark.parametrize(
    "kind,expected",
    [
        # qk + vo: 2 heads x 2 x 4^2; alpha: 2 heads; key shift and value shift (softmax
        # with biases): 2 heads x 4 each
        ("sa-relu", 64 + 2),
        ("sa-identity", 64 + 2),
        ("sa-softmax", 64 + 8 + 8),
        ("sa-softmax-nobias", 64),
        ("mha", 64 + 8 + 8),
        # nn.TransformerEncoderLayer, captured by torch.export and analyzed by the graph
        # rules: attention as above, the ReLU units' scales (16), and post-norm's
        # LayerNorm factors: norm1's beta shift (8) and kernel (16: the rows of linear1 and
        # the residual along 1/gamma), the outputs along 1 of the two writers of the
        # normalized sums (out_proj 9, linear2 17). Equal to n - rank J (coverage table).
        ("tel", 64 + 8 + 8 + 16 + 8 + 16 + 9 + 17),
        # two layers: layer 0's norm2 now feeds layer 1 (its shift 8, kernel 24)
        ("enc", 2 * (64 + 8 + 8 + 16 + 8 + 16 + 9 + 17) + 8 + 24),
    ],
)
def test_dim(kind, expected, gen):
    m, _ = _make(kind, gen)
    group = gaugenet.symmetries(m)
    assert group.dim == expected
    assert len(group.of_kind("permutation")) == {"tel": 2, "enc": 4}.get(kind, 1)


def _alpha_only(m: SelfAttention, alpha: torch.Tensor) -> nn.Module:
    """Apply the α part of eq. 37 to `m` regardless of its activation."""
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    fs = attention_factors(self_attention_layout(m), shapes, softmax=False, homogeneous=True)
    return GaugeGroup(tuple(fs)).act(m, {"alpha": alpha})


@pytest.mark.parametrize("act", ["softmax", "gelu"])
def test_alpha_breaks_non_homogeneous(act, gen):
    phi = "softmax" if act == "softmax" else F.gelu
    m = SelfAttention(8, 2, activation=phi, dtype=F64, generator=gen)
    assert not gaugenet.symmetries(m).of_kind("rescaling")
    x = torch.randn(3, 5, 8, generator=gen, dtype=F64)
    err = gaugenet.invariance_error(m, _alpha_only(m, torch.tensor([2.0, 0.5], dtype=F64)), x)
    assert err > 1e-3
    # the same α on a relu layer is exact: the difference is the activation, not the code
    r = SelfAttention(8, 2, activation="relu", dtype=F64, generator=gen)
    assert (
        gaugenet.invariance_error(r, _alpha_only(r, torch.tensor([2.0, 0.5], dtype=F64)), x) < 1e-12
    )


def test_declared_homogeneous_callable(gen):
    m = SelfAttention(
        8, 2, activation=lambda s: F.leaky_relu(s, 0.1), homogeneous=True, dtype=F64, generator=gen
    )
    group = gaugenet.symmetries(m)
    assert group.factor("alpha").dim == 2
    x = torch.randn(2, 4, 8, generator=gen, dtype=F64)
    assert gaugenet.invariance_error(m, group.act(m, group.sample(gen, scale=SCALE)), x) < 1e-11


def test_wrong_key_transform_changes_output(gen):
    """`W_k ↦ W_k A` (instead of `A⁻ᵀ`) is no symmetry."""
    m, (x,) = _make("sa-softmax", gen)
    group = gaugenet.symmetries(m)
    a = group.sample(gen)["qk"]
    bad = SelfAttention(8, 2, activation="softmax", dtype=F64)
    st = model_state(m)
    with torch.no_grad():
        for n, p in bad.named_parameters():
            p.copy_(st[n])
        bad.w_q.copy_(torch.einsum("dhi,hij->dhj", st["w_q"].reshape(8, 2, 4), a).reshape(8, 8))
        bad.b_q.copy_(torch.einsum("hi,hij->hj", st["b_q"].reshape(2, 4), a).reshape(8))
        bad.w_k.copy_(torch.einsum("dhi,hij->dhj", st["w_k"].reshape(8, 2, 4), a).reshape(8, 8))
    assert gaugenet.invariance_error(m, bad, x) > 1e-3


@pytest.mark.parametrize("kind", ["sa-relu", "sa-softmax", "tel"])
def test_compose_and_inverse(kind, gen):
    m, x = _make(kind, gen)
    group = gaugenet.symmetries(m)
    g, h = group.sample(gen), group.sample(gen)
    two = group.act(group.act(m, g), h)
    one = group.act(m, group.compose(g, h))
    sa, sb = model_state(two), model_state(one)
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-10
    back = group.act(group.act(m, g), group.inverse(g))
    assert gaugenet.invariance_error(back, m, x) < 1e-12
    assert (
        max(float((model_state(back)[k] - model_state(m)[k]).abs().max()) for k in model_state(m))
        < 1e-10
    )


@pytest.mark.parametrize("kind", ["sa-relu", "sa-identity", "sa-softmax", "mha", "tel"])
def test_canonical_form_and_align(kind, gen):
    m, x = _make(kind, gen)
    group = gaugenet.symmetries(m)
    g = group.sample(gen, scale=1.0)
    if kind == "tel":  # the rest of the layer has its own (generic) gauge; fix only attention
        g = {k: v for k, v in g.items() if k.startswith("self_attn.")}
    m2 = group.act(m, g)
    c1, c2 = canonicalize_attention(m, group), canonicalize_attention(m2, group)
    assert gaugenet.invariance_error(m, c1, x) < 1e-12
    s1, s2 = model_state(c1), model_state(c2)
    assert max(float((s1[k] - s2[k]).abs().max()) for k in s1) < 1e-9  # unique representative
    found = align_attention(m, m2, group)
    assert max(float((found[k].double() - g[k].double()).abs().max()) for k in g) < 1e-8
    # the generic entry points reach the attention factors through the registered hooks
    found2 = gaugenet.align(m, m2, group=group)
    for k in g:
        if k.startswith(("self_attn", "qk", "vo", "alpha", "key_shift", "heads")):
            assert float((found2[k].double() - g[k].double()).abs().max()) < 1e-8, k


def test_canonical_form_is_balanced_svd(gen):
    m = SelfAttention(8, 2, activation="relu", dtype=F64, generator=gen)
    c = canonicalize_attention(m)
    lay = self_attention_layout(c)
    st = model_state(c)
    wq, wk, wv, wo = lay.proj(st, "q"), lay.proj(st, "k"), lay.proj(st, "v"), lay.out(st)
    s_qk = wq.transpose(-1, -2) @ wq
    # W_q = U S^{1/2}, W_k = V S^{1/2}: both Gram matrices equal the same diagonal S
    assert torch.allclose(
        s_qk, torch.diag_embed(torch.diagonal(s_qk, dim1=-2, dim2=-1)), atol=1e-12
    )
    assert torch.allclose(wk.transpose(-1, -2) @ wk, s_qk, atol=1e-12)
    assert torch.allclose(wv.transpose(-1, -2) @ wv, wo @ wo.transpose(-1, -2), atol=1e-12)
    # sign convention: the largest-magnitude entry of each column of W_q and W_v is positive
    for w in (wq, wv):
        idx = w.abs().argmax(-2, keepdim=True)
        assert (torch.gather(w, -2, idx) > 0).all()
    # alpha balances: |W_qk| = |W_vo| per head; heads sorted by |W_qk| |W_vo|
    n_qk = torch.linalg.matrix_norm(lay.qk(st))
    n_vo = torch.linalg.matrix_norm(lay.vo(st))
    assert torch.allclose(n_qk, n_vo, rtol=1e-12)
    assert (n_qk[:-1] >= n_qk[1:]).all()


def test_softmax_key_bias_canonical_zero(gen):
    m = SelfAttention(8, 2, activation="softmax", dtype=F64, generator=gen)
    c = canonicalize_attention(m)
    assert float(c.b_k.detach().abs().max()) == 0.0
    # the whole key bias is gauge: changing it changes nothing, changing b_q does
    x = torch.randn(2, 4, 8, generator=gen, dtype=F64)
    with torch.no_grad():
        c.b_q.add_(1.0)
    assert gaugenet.invariance_error(m, c, x) > 1e-3


def test_observables(gen):
    m, (x,) = _make("sa-softmax", gen)
    group = gaugenet.symmetries(m)
    m2 = group.act(m, group.sample(gen, discrete=False))
    for obs in (qk_matrices, vo_matrices):
        a, b = obs(m)[""], obs(m2)[""]
        assert a.shape == (2, 8, 8)
        assert float((a - b).abs().max() / a.abs().max()) < 1e-12
    with torch.no_grad():
        m2.w_q.mul_(1.1)
    assert float((qk_matrices(m)[""] - qk_matrices(m2)[""]).abs().max()) > 1e-3


def test_inside_sequential(gen):
    model = nn.Sequential(
        nn.Linear(8, 8, dtype=F64), SelfAttention(8, 2, activation="relu", dtype=F64, generator=gen)
    )
    x = torch.randn(3, 5, 8, generator=gen, dtype=F64)
    group = gaugenet.symmetries(model, x)
    assert group.factor("1.qk").dim == 32 and group.factor("1.alpha").dim == 2
    assert gaugenet.invariance_error(model, group.act(model, group.sample(gen)), x) < 1e-11


def test_breakers_and_bad_inputs(gen):
    kv = nn.MultiheadAttention(8, 2, add_bias_kv=True, dtype=F64)
    group = gaugenet.symmetries(kv)
    assert group.dim == 0 and "add_bias_kv" in str(group.breakers[0])
    tel = nn.TransformerEncoderLayer(8, 2, 16, activation="gelu", dtype=F64)
    group = gaugenet.symmetries(tel)
    assert not group.of_kind("rescaling") and any("GELU" in str(b) for b in group.breakers)
    with pytest.raises(gaugenet.GaugeError, match="divisible"):
        SelfAttention(7, 2, activation="relu")
    with pytest.raises(gaugenet.GaugeError, match="unknown activation"):
        SelfAttention(8, 2, activation="tanh")
    m = SelfAttention(8, 2, activation="relu", dtype=F64)
    group = gaugenet.symmetries(m)
    with pytest.raises(gaugenet.GaugeError, match="singular"):
        group.act(m, {"qk": torch.zeros(2, 4, 4, dtype=F64)})
    with pytest.raises(gaugenet.GaugeError, match="positive"):
        group.act(m, {"alpha": torch.tensor([1.0, -1.0], dtype=F64)})
    with pytest.raises(gaugenet.GaugeError, match="no attention"):
        qk_matrices(nn.Sequential(nn.Linear(3, 3)))


def test_value_shift_needs_softmax(gen):
    """The value-bias shift is absorbed by the output bias only because a query's softmax
    weights sum to one: the same parameter change moves a ReLU attention's output."""
    soft = SelfAttention(8, 2, activation="softmax", dtype=F64, generator=gen)
    x = torch.randn(3, 5, 8, dtype=F64, generator=gen)
    group = gaugenet.symmetries(soft)
    shift = next(f for f in group.factors if f.name.endswith("value_shift"))
    u = {shift.name: torch.randn(shift.n, dtype=F64, generator=gen)}
    assert gaugenet.invariance_error(soft, group.act(soft, u), x) < 1e-12
    relu = SelfAttention(8, 2, activation="relu", dtype=F64, generator=gen)
    relu.load_state_dict(soft.state_dict())
    assert not any(f.name.endswith("value_shift") for f in gaugenet.symmetries(relu).factors)
    with pytest.raises(gaugenet.GaugeError, match="found for another model"):
        group.act(relu, u)  # the softmax model's group refuses the ReLU one, rightly:
    forced = group.act(relu, u, check=False)
    assert gaugenet.invariance_error(relu, forced, x) > 1e-3


class _Nested(nn.Module):
    """torch's encoder and decoder layers inside a user's model (fx would keep them whole)."""

    def __init__(self) -> None:
        super().__init__()
        kw = dict(dropout=0.0, batch_first=True, dtype=F64)
        self.body = nn.TransformerEncoderLayer(8, 2, 16, **kw)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.dec(h, h)


@pytest.mark.parametrize("grad", [True, False])
def test_torch_layers_are_captured_not_analyzed_by_type(grad, gen):
    """`nn.TransformerEncoderLayer` has no analyzer of its own: its parts (attention, ReLU
    units, LayerNorm shifts and kernels) come from the captured graph, also when nested in
    a user's model and under `no_grad` (where torch would take its fused fast path), and
    they explain every redundancy of the Jacobian."""
    model = _Nested().eval()
    x = torch.randn(48, 5, 8, generator=gen, dtype=F64)
    with torch.set_grad_enabled(grad):
        group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if "unsupported module" in b.reason]
    assert {"body.self_attn.qk", "dec.self_attn.qk", "dec.multihead_attn.vo"} <= {
        f.name for f in group.factors
    }
    report = gaugenet.certify(model, x, group=group, method="exact")
    assert report.verdict == "complete", report
    moved = group.act(model, group.sample(gen))
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    # negative: the same element on the encoder's first LayerNorm alone changes the outputs
    wrong = group.act(model, group.sample(gen))
    with torch.no_grad():
        wrong.body.norm1.weight.mul_(2.0)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3
