"""Attention with soft-capped scores, `c · tanh(s / c)` before the softmax (Gemma 2): the
query-key GL (moving the key bias with the keys) and the value-output GL hold; the key-bias
shift does not, and is not offered. Float64 invariance, the count against `n − rank J`,
group laws, the shift as the negative."""

from __future__ import annotations

import copy

import torch
import transformers

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.attention._factors import KeyShiftFactor
from gaugenet.certify import Verdict
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.discovery.rules._examples import batch, seeded, token_ids
from gaugenet.discovery.rules.soft_capping import SoftCappedAttention
from gaugenet.groups import model_state

F64 = torch.float64


def _model(cap: float | None = 1.0) -> tuple[torch.nn.Module, torch.Tensor]:
    return seeded(lambda: SoftCappedAttention(6, 2, cap)), batch(32, 5, 6)


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _factor(group, suffix: str):
    return next(f for f in group.factors if f.name.endswith(suffix))


def test_capped_attention_is_found_and_complete() -> None:
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    # by hand, 2 heads of 3: query-key GL(3) per head (18), value-output GL(3) per head
    # (18), the value bias moved into the output bias (6); no key shift
    assert group.dim == 42
    assert not any(isinstance(f, KeyShiftFactor) for f in group.factors)
    assert "k.bias" in _factor(group, "qk").params()  # the key bias turns with the keys
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
    assert report.n_params - report.functional_dimension == 42


def test_random_elements_keep_outputs_float64() -> None:
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    ref, gen = _out(model, x), torch.Generator().manual_seed(0)
    for _ in range(3):
        assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-13


def test_group_laws_of_query_key() -> None:
    model, x = _model()
    qk = _factor(gaugenet.symmetries(model, x), "qk")
    state, gen = model_state(model), torch.Generator().manual_seed(1)
    a, b = qk.sample(gen), qk.sample(gen)

    def close(s: dict, t: dict) -> bool:
        return all(torch.allclose(s[k], t[k], rtol=1e-12, atol=1e-12) for k in s)

    assert close(qk.apply(qk.apply(state, a), b), qk.apply(state, qk.compose(a, b)))
    assert close(qk.apply(qk.apply(state, a), qk.inverse(a)), state)


def test_key_bias_shift_breaks_under_capping_only() -> None:
    """Negative: the key-bias shift the plain softmax allows changes the capped outputs."""
    plain, x = _model(cap=None)
    group = gaugenet.symmetries(plain, x)
    shift = next(f for f in group.factors if isinstance(f, KeyShiftFactor))
    assert group.dim == 42 + shift.dim == 48
    assert "k.bias" not in _factor(group, "qk").params()
    c = shift.sample(torch.Generator().manual_seed(2), F64, 1.0)
    moved = group.act(plain, {shift.name: c})
    assert relative_error(_out(moved, x), _out(plain, x)) < 1e-13
    capped, _ = _model()
    shifted = copy.deepcopy(capped)
    shifted.load_state_dict(shift.apply(model_state(capped), c))
    assert not torch.equal(shifted.k.bias, capped.k.bias)
    assert relative_error(_out(shifted, x), _out(capped, x)) > 1e-3


def test_scores_times_themselves_lose_the_key_shift() -> None:
    """`softmax(s · s)`: a nonlinear function of the scores written as a product with
    themselves; the query-key and value-output GL hold (they keep every score), the key
    shift does not (`(s + a)² − s²` varies over the keys), and is not offered."""

    class Squared(SoftCappedAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
            s = torch.matmul(q, k.transpose(-2, -1)) / 3
            a = torch.matmul(torch.softmax(s * s, dim=-1), v)
            return self.o(a.transpose(1, 2).reshape(x.shape))

    model, x = seeded(lambda: Squared(6, 2)), batch(32, 5, 6)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    assert not any(isinstance(f, KeyShiftFactor) for f in group.factors)
    assert group.dim == 42
    ref, gen = _out(model, x), torch.Generator().manual_seed(3)
    assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-13


def test_gemma2_with_biases_is_complete() -> None:
    """A one-layer `Gemma2Model` with attention biases (float64): soft-capped scores, sandwich
    norms with gains `1 + w`. By hand: the input and pre-feedforward norms' gains (8 + 8), the
    MLP (16), query-key (8, the key bias included) and value-output (32) GL, the value bias
    into the output bias (8); no key shift: 80, all of `n − rank J`."""
    cfg = transformers.Gemma2Config(
        vocab_size=24,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=6,
        use_cache=False,
        attention_bias=True,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2Model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    ids = token_ids(24, 40, 6)
    group = gaugenet.symmetries(model, {"input_ids": ids})
    assert group.dim == 80
    assert not any(isinstance(f, KeyShiftFactor) for f in group.factors)
    with keep_float64():  # the norms compute in float32 otherwise: rounding hides the rank
        report = gaugenet.certify(model, {"input_ids": ids}, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
