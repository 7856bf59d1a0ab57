"""No wrong answer: every factor `symmetries` returns keeps the outputs on the example inputs.

The three wrong answers that discovery gave before the self-check, each reproduced: a
BERT-named model whose attention applies rotary position embeddings (the module-name
analyzer offered the full query-key `GL`), a depthwise convolution (a channel permutation
that changes the outputs), and an ELECTRA model whose embedding size differs from its hidden
size (LayerNorm factors whose action crashes). Then the self-check itself: wrong and
crashing factors are dropped and named, float32 operations inside a float64 model are not
mistaken for breakers.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugenet
from gaugenet.discovery._inputs import as_call
from gaugenet.discovery._selfcheck import INTERNAL_ERROR, _Checker, self_check
from gaugenet.groups import GaugeGroup, RescalingFactor, Scale

F64 = torch.float64
transformers = pytest.importorskip("transformers")


def _internal(group: GaugeGroup) -> list[str]:
    return [b.node for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]


def _keeps_outputs(model: nn.Module, group: GaugeGroup, x, gen: torch.Generator) -> float:
    return gaugenet.invariance_error(model, group.act(model, group.sample(gen), check=False), x)


# -- rotary attention in a BERT-named module tree -------------------------------------------


def _rotate(x: Tensor) -> Tensor:
    """Rotary position embedding of `(B, H, T, d)` on the two halves of each head."""
    T, d = x.shape[-2], x.shape[-1]
    freq = 10000.0 ** (-torch.arange(d // 2, dtype=x.dtype) / (d // 2))
    angle = torch.arange(T, dtype=x.dtype)[:, None] * freq
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class AnglesSelfAttention(transformers.models.bert.modeling_bert.BertSelfAttention):
    """BERT self-attention with rotary embeddings on queries and keys (no config flag, no
    module or class named "rotary": only the computation shows it)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kw):
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.attention_head_size)
        q, k, v = (
            f(hidden_states).view(shape).transpose(1, 2) for f in (self.query, self.key, self.value)
        )
        scores = _rotate(q) @ _rotate(k).transpose(-1, -2) * self.scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(B, T, -1), None


def _rotary_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(cfg)
    for i, layer in enumerate(model.encoder.layer):
        rot = AnglesSelfAttention(cfg, layer_idx=i)
        rot.load_state_dict(layer.attention.self.state_dict())
        layer.attention.self = rot
    with torch.no_grad():  # weights of unit gain: attention far from uniform
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 1.5 / m.in_features**0.5)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0, 1)
    return model.double().eval()


def test_rotary_bert_query_key_is_the_commutant(gen) -> None:
    """A BERT whose self-attention rotates queries and keys by position: the query-key
    factor found in the graph is the commutant of the rotations (a full GL element there
    changes the outputs), and the group keeps the outputs."""
    model = _rotary_bert()
    ids = torch.randint(0, 40, (3, 7), generator=gen)
    x = {"input_ids": ids}
    group = gaugenet.symmetries(model, x)
    assert not _internal(group)
    qks = [f for f in group.factors if f.name.endswith(".qk")]
    assert len(qks) == 2 and all(f.basis is not None and f.m < f.d**2 for f in qks)
    qk = qks[0]
    full = gaugenet.groups.AlgebraFactor(qk.name, qk.d, qk.b, terms=qk.terms)
    wrong = dataclasses.replace(group, factors=(full,))
    moved = wrong.act(model, {qk.name: full.sample(gen)}, check=False)
    assert gaugenet.invariance_error(model, moved, x) > 1e-3
    assert any(f.name.endswith(".vo") for f in group.factors)
    assert _keeps_outputs(model, group, x, gen) < 1e-9


# -- depthwise and grouped convolutions ------------------------------------------------------


class Separable(nn.Module):
    """Optional stem, a grouped (or depthwise) convolution, a pointwise one, a linear head."""

    def __init__(self, c: int, mid: int, groups: int, *, stem: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1) if stem else None
        self.dw = nn.Conv2d(c, mid, 3, padding=1, groups=groups)
        self.pw, self.head = nn.Conv2d(mid, 3, 1), nn.Linear(3, 2)
        with torch.no_grad():  # unit gain, small biases: every ReLU unit active on part
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.normal_(0, m.weight[0].numel() ** -0.5)
                    m.bias.normal_(0, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x)) if self.stem is not None else x
        h = F.relu(self.pw(F.relu(self.dw(h))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize(
    ("c", "mid", "groups", "stem"),
    [(4, 4, 4, True), (4, 8, 4, True), (4, 4, 2, True), (2, 2, 2, False), (4, 8, 2, True)],
)
def test_depthwise_and_grouped_convolutions(c, mid, groups, stem, gen) -> None:
    torch.manual_seed(0)
    model = Separable(c, mid, groups, stem=stem).double()
    x = torch.randn(5, 2 if stem else c, 6, 6, generator=gen, dtype=F64)
    group = gaugenet.symmetries(model, x)
    assert _internal(group) == []  # fixed at the rule, not only caught by the self-check
    assert not any(t.param == "dw.weight" for f in group.of_kind("permutation") for t in f.terms)
    assert _keeps_outputs(model, group, x, gen) < 1e-9
    # the rescaling of the grouped convolution's outputs is kept: 3 + mid (+ c with a stem)
    assert group.dim == 3 + mid + (c if stem else 0)
    # negative: permuting the grouped convolution's outputs (and the pointwise columns)
    p = torch.roll(torch.arange(mid), 1)
    moved = group.act(model, group.identity())
    with torch.no_grad():
        moved.dw.weight.copy_(model.dw.weight[p])
        moved.dw.bias.copy_(model.dw.bias[p])
        moved.pw.weight.copy_(model.pw.weight[:, p])
    assert gaugenet.invariance_error(model, moved, x) > 1e-3


# -- embedding size different from the hidden size ------------------------------------------


def test_electra_with_projected_embeddings(gen) -> None:
    torch.manual_seed(0)
    cfg = transformers.ElectraConfig(
        vocab_size=50,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=16,
    )
    model = transformers.ElectraModel(cfg).double().eval()
    x = {"input_ids": torch.randint(0, 50, (2, 5), generator=gen)}
    # the embeddings' LayerNorm is read through the projection to the hidden size: its
    # kernel lives in that projection's rows, found from the graph
    group = gaugenet.symmetries(model, x)
    assert not _internal(group)
    assert group.factor("ln_kernel:embeddings.LayerNorm").dim == 16
    assert group.dim > 0 and group.of_kind("gl")  # the attention factors
    for _ in range(3):
        assert _keeps_outputs(model, group, x, gen) < 1e-9


# -- the self-check itself -------------------------------------------------------------------


def _mlp(act: type[nn.Module]) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)).double()


def test_wrong_rescaling_dropped_permutation_kept(gen) -> None:
    x = torch.randn(20, 4, generator=gen, dtype=F64)
    relu_group = gaugenet.symmetries(_mlp(nn.ReLU), x)
    assert relu_group.dim == 6 and _internal(relu_group) == []
    gelu = _mlp(nn.GELU)  # same parameter names: the ReLU group offered to a GELU network
    checked = self_check(gelu, as_call(x), relu_group)
    assert [f.kind for f in checked.factors] == ["permutation"]  # permutations pass GELU
    assert _internal(checked) == [relu_group.of_kind("rescaling")[0].name]
    assert _keeps_outputs(gelu, checked, x, gen) < 1e-12


def test_crashing_factor_dropped() -> None:
    model = _mlp(nn.ReLU)
    x = torch.randn(20, 4, dtype=F64)
    good = gaugenet.symmetries(model, x)
    bad = RescalingFactor("bad", 2, terms=(Scale("missing.weight", torch.arange(2), 1),))
    group = GaugeGroup((*good.factors, bad), good.breakers, good.param_names)
    checked = self_check(model, as_call(x), group)
    assert _internal(checked) == ["bad"] and "raised KeyError" in checked.breakers[-1].reason
    assert checked.dim == good.dim


class Float32Hidden(nn.Module):
    """A float64 ReLU network whose hidden layer is computed in float32 (as a float64 model
    computing a softmax or a norm's variance in float32 does)."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, *, low: bool = True) -> None:
        super().__init__()
        self.net, self.low = _mlp(act), low

    def forward(self, x: Tensor) -> Tensor:
        if not self.low:
            return self.net(x)
        l1 = self.net[0]
        h = F.linear(x.float(), l1.weight.float(), l1.bias.float())
        return self.net[2](self.net[1](h).double())


def test_float32_internal_ops_are_not_breakers(gen) -> None:
    model, x = Float32Hidden(), torch.randn(20, 4, generator=gen, dtype=F64)
    # the float32 casts are kept in float64 ...
    assert _Checker(model, as_call(x), gen).tol == 1e-8
    # ... and where they cannot be, the float32 layer is seen and sets the tolerance
    loose = _Checker(model, as_call(x), gen, force64=False)
    assert loose.tol == 1e-4
    twin = Float32Hidden(low=False)  # the same network all in float64
    assert _Checker(twin, as_call(x), gen, force64=False).tol == 1e-8
    group = gaugenet.symmetries(twin, x)
    checked = self_check(model, as_call(x), group)
    assert checked.dim == group.dim == 6 and _internal(checked) == []
    from gaugenet.discovery._selfcheck import _isolate

    assert _isolate(group, loose.failure) is group  # every factor passes at 1e-4
    # the float32 layer's rounding: above the float64 tolerance, far below a real break
    err = _keeps_outputs(model, group, x, gen)
    assert 1e-8 < err < 1e-5
    # negative: a wrong factor is still caught at the float32 tolerance
    gelu = Float32Hidden(nn.GELU)
    assert _internal(self_check(gelu, as_call(x), group)) == [group.of_kind("rescaling")[0].name]


def test_inputs_as_tensor_tuple_or_dict(gen) -> None:
    model = _mlp(nn.ReLU)
    x = torch.randn(20, 4, generator=gen, dtype=F64)
    dims = {gaugenet.symmetries(model, a).dim for a in (x, (x,), [x], {"input": x})}
    assert dims == {6}
    with pytest.raises(gaugenet.GaugeError, match="example_inputs"):
        gaugenet.symmetries(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)))
    assert math.isfinite(_keeps_outputs(model, gaugenet.symmetries(model), x, gen))


@pytest.mark.parametrize("kind", ["sa-relu", "sa-softmax", "mha", "mha-kdim", "tel", "enc"])
def test_attention_analyzers_pass_the_self_check(kind, gen) -> None:
    from test_attention import _make

    model, x = _make(kind, gen)
    assert _internal(gaugenet.symmetries(model, x)) == []
    assert _internal(gaugenet.symmetries(model)) == []  # inputs inferred
