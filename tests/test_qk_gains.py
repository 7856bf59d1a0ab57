"""Normalized queries and keys (Qwen3's and Gemma 3's per-head RMSNorm, OLMo 2's over all
heads): the query-key GL is broken by the norms, and what is left is the diagonal part of
the commutant of the score maps, acting on the norms' gains (`_attention_gain.py`). Float64
invariance, the count against `n − rank J`, group laws, and negatives: a scale that splits
a rotary plane, and a query gain scaled without the key gain, change the outputs."""

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
from gaugenet.discovery.rules._examples import batch, seeded
from gaugenet.groups import RescalingFactor, model_state
from tiny_hf import DECODER, tiny_hf

F64 = torch.float64


def _rms(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class NormedAttention(nn.Module):
    """Attention over 8 features, 2 heads of 4, RMSNorm on queries and keys before an
    optional rotary embedding (planes `(i, i + 2)`): per head with one gain of 4 shared by
    the heads (`shared`), or over all 8 features with a gain of 8."""

    def __init__(self, shared: bool = True, rotary: bool = True) -> None:
        super().__init__()
        self.shared, self.rotary = shared, rotary
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8, bias=False) for _ in range(4))
        width = 4 if shared else 8
        self.q_gain = nn.Parameter(torch.randn(width))
        self.k_gain = nn.Parameter(torch.randn(width))
        angle = torch.arange(6.0)[:, None] * torch.tensor([1.0, 0.1])[None, :]  # (T, planes)
        self.register_buffer("cos", torch.cat([angle.cos(), angle.cos()], -1))
        self.register_buffer("sin", torch.cat([angle.sin(), angle.sin()], -1))

    def _heads(self, y: Tensor, gain: Tensor | None = None) -> Tensor:
        B, T, _ = y.shape
        if gain is not None and not self.shared:
            y = _rms(y) * gain
        y = y.view(B, T, 2, 4)
        if gain is not None and self.shared:
            y = _rms(y) * gain
        y = y.transpose(1, 2)
        if gain is not None and self.rotary:
            half = torch.cat([-y[..., 2:], y[..., :2]], -1)
            y = y * self.cos[:T] + half * self.sin[:T]
        return y

    def forward(self, x: Tensor) -> Tensor:
        q = self._heads(self.q(x), self.q_gain)
        k = self._heads(self.k(x), self.k_gain)
        v = self._heads(self.v(x))
        a = torch.softmax(q @ k.transpose(-2, -1) / 2, dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(x.shape))


def _out(model: nn.Module, x) -> Tensor:
    with torch.no_grad():
        return model(**x)[0] if isinstance(x, dict) else model(x)


def _gains(group) -> RescalingFactor:
    return next(f for f in group.factors if f.name.endswith("qk_gains"))


# by hand: value-output GL(4) per head (32), and the gain scales: one per rotary plane,
# shared by the heads (2) or per head (4); one per coordinate without rotary (4 or 8)
CASES = [(True, True, 2), (False, True, 4), (True, False, 4), (False, False, 8)]


@pytest.mark.parametrize("shared,rotary,gains", CASES)
def test_normalized_queries_and_keys_are_complete(shared: bool, rotary: bool, gains: int) -> None:
    model, x = seeded(lambda: NormedAttention(shared, rotary)), batch(32, 6, 8)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    assert _gains(group).dim == gains
    assert group.dim == 32 + gains
    assert set(_gains(group).params()) == {"q_gain", "k_gain"}
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
    ref, gen = _out(model, x), torch.Generator().manual_seed(0)
    for _ in range(3):
        assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-13


def test_group_laws_of_the_gain_scales() -> None:
    model, x = seeded(lambda: NormedAttention()), batch(32, 6, 8)
    f = _gains(gaugenet.symmetries(model, x))
    state, gen = model_state(model), torch.Generator().manual_seed(1)
    a, b = f.sample(gen), f.sample(gen)

    def close(s: dict, t: dict) -> bool:
        return all(torch.allclose(s[k], t[k], rtol=1e-12, atol=1e-12) for k in s)

    assert close(f.apply(f.apply(state, a), b), f.apply(state, f.compose(a, b)))
    assert close(f.apply(f.apply(state, a), f.inverse(a)), state)


def _scaled(model: nn.Module, q: Tensor, k: Tensor) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.q_gain.mul_(q)
        out.k_gain.mul_(k)
    return out


def test_a_scale_that_splits_a_rotary_plane_changes_the_outputs() -> None:
    """Negative: coordinate 0 of the query gain times 2 and of the key gain times 1/2 keeps
    the scores without rotary, and changes them when coordinates 0 and 2 turn together."""
    s = torch.tensor([2.0, 1.0, 1.0, 1.0])
    for rotary, moved in ((False, False), (True, True)):
        model, x = seeded(lambda r=rotary: NormedAttention(True, r)), batch(32, 6, 8)
        err = relative_error(_out(_scaled(model, s, 1 / s), x), _out(model, x))
        assert (err > 1e-3) if moved else (err < 1e-13)


def test_a_query_gain_scaled_alone_changes_the_outputs() -> None:
    model, x = seeded(lambda: NormedAttention()), batch(32, 6, 8)
    s = torch.full((4,), 2.0)
    assert relative_error(_out(_scaled(model, s, torch.ones(4)), x), _out(model, x)) > 1e-3
    assert relative_error(_out(_scaled(model, s, 1 / s), x), _out(model, x)) < 1e-13


def _hf(cls: str, cfg: str, **kw) -> tuple[nn.Module, dict]:
    return tiny_hf(cls, cfg, **{**DECODER, **kw})


@pytest.mark.parametrize(
    "cls,cfg,kw,gains",
    [
        # per-head norms, one gain of 4 shared by the heads: one scale per rotary plane
        ("Qwen3Model", "Qwen3Config", {"head_dim": 4}, 2),
        # one norm over both heads' 8 features: one scale per plane and head
        ("Olmo2Model", "Olmo2Config", {}, 4),
        # gains `1 + w`, the norm applied after the heads are moved forward
        ("Gemma3TextModel", "Gemma3TextConfig", {"head_dim": 4}, 2),
        ("Exaone4Model", "Exaone4Config", {"head_dim": 4}, 2),
    ],
)
def test_hugging_face_normalized_attention_is_complete(cls, cfg, kw, gains) -> None:
    model, x = _hf(cls, cfg, **kw)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    assert _gains(group).dim == gains
    with keep_float64():  # the norms compute in float32 otherwise: rounding hides the rank
        report = gaugenet.certify(model, x, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
    ref, gen = _out(model, x), torch.Generator().manual_seed(2)
    assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-6


def test_layernorm_modules_on_queries_and_keys() -> None:
    """`PersimmonModel`: an `nn.LayerNorm` of the head size on queries and keys (gain and
    bias), half the head rotary: one scale for the rotated plane and one per unrotated
    coordinate (3), moving `γ` and `β` together; every factor found holds (tangents in the
    Jacobian's kernel, random elements). The kernel of the per-head norms on the fused
    projection's rows, and the count, are in `test_qk_layernorm_kernel.py`."""
    model, x = _hf("PersimmonModel", "PersimmonConfig")
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    gains = _gains(group)
    assert gains.dim == 3
    names = {n.rpartition(".")[2] for n in gains.params()}
    assert names == {"weight", "bias"}
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-10
    ref, gen = _out(model, x), torch.Generator().manual_seed(3)
    assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-10


def test_squared_relu_mlp_is_complete() -> None:
    """`ArceeModel`: its MLP is `down(relu(up(x))²)`, captured as `aten.square`: each unit's
    row scales by `α`, its column by `α⁻²` (a power `2` in the exponent system)."""
    model, x = _hf("ArceeModel", "ArceeConfig")
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if "square" in b.reason]
    with keep_float64():
        report = gaugenet.certify(model, x, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
