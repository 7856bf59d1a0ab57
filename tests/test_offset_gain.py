"""Gains stored with an offset, `x̂ · (1 + w)` (Gemma's RMSNorm): the effective gain rescales,
`w ↦ α (1 + w) − 1` against its readers' columns, and the residual-stream rotation
conjugates the readers by `1 + w`. Float64 invariance, the count against `n − rank J`,
group laws, a multiplicative scaling of `w` as the negative, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import gaugenet
from gaugenet import GaugeError
from gaugenet._invariance import relative_error
from gaugenet.certify import Verdict
from gaugenet.discovery._float64 import keep_float64
from gaugenet.discovery.rules._examples import batch, seeded, token_ids
from gaugenet.discovery.rules.offset_gains import OffsetRMS, OffsetStream
from gaugenet.dynamics import noether_charges
from gaugenet.groups import (
    GaugeGroup,
    OffsetScale,
    OrthogonalFactor,
    RescalingFactor,
    Scale,
    model_state,
)
from gaugenet.groups._orthogonal import ConjugatedColumns

F64 = torch.float64


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _rms() -> tuple[torch.nn.Module, torch.Tensor]:
    return seeded(lambda: OffsetRMS(6, 3)), batch(64, 6)


def _gain_factor(group) -> RescalingFactor:
    (f,) = [f for f in group.factors if isinstance(f, RescalingFactor) and "w" in f.params()]
    return f


def test_offset_gain_is_found_and_complete() -> None:
    model, x = _rms()
    group = gaugenet.symmetries(model, x)
    f = _gain_factor(group)
    # by hand: each of the 6 effective gains 1 + w_i against the reader's column i
    assert group.dim == f.dim == 6
    assert any(isinstance(t, OffsetScale) and t.param == "w" and t.offset == 1 for t in f.terms)
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
    assert report.n_params - report.functional_dimension == 6


def test_random_elements_keep_outputs_float64() -> None:
    model, x = _rms()
    group = gaugenet.symmetries(model, x)
    ref, gen = _out(model, x), torch.Generator().manual_seed(0)
    for _ in range(3):
        g = group.sample(gen)
        moved = group.act(model, g)
        assert relative_error(_out(moved, x), ref) < 1e-13
        # the stored entries moved as `α (1 + w) − 1`: the effective gain scaled by `α`
        a = g[_gain_factor(group).name]
        assert torch.allclose(moved.w + 1, a * (model.w + 1), rtol=1e-14, atol=0)


def test_multiplicative_scaling_of_w_changes_outputs() -> None:
    """Negative: `w ↦ α w` (the plain `Scale`) with the same reader columns is no symmetry."""
    model, x = _rms()
    f = _gain_factor(gaugenet.symmetries(model, x))
    plain = RescalingFactor(
        "plain",
        f.n,
        terms=tuple(
            Scale(t.param, t.index, t.power) if isinstance(t, OffsetScale) else t for t in f.terms
        ),
    )
    a = torch.exp(0.5 * torch.randn(f.n, generator=torch.Generator().manual_seed(1), dtype=F64))
    state = model_state(model)
    good = f.apply(state, a)
    bad = plain.apply(state, a)
    moved = copy.deepcopy(model)
    moved.load_state_dict(good)
    assert relative_error(_out(moved, x), _out(model, x)) < 1e-13
    moved.load_state_dict(bad)
    assert relative_error(_out(moved, x), _out(model, x)) > 1e-2


def test_group_laws() -> None:
    model, x = _rms()
    f = _gain_factor(gaugenet.symmetries(model, x))
    state = model_state(model)
    gen = torch.Generator().manual_seed(2)
    a, b = f.sample(gen), f.sample(gen)

    def close(s: dict, t: dict) -> bool:
        return all(torch.allclose(s[k], t[k], rtol=1e-13, atol=1e-14) for k in s)

    assert close(f.apply(f.apply(state, a), b), f.apply(state, f.compose(a, b)))
    assert close(f.apply(f.apply(state, a), f.inverse(a)), state)
    ident = f.apply(state, f.identity())
    assert all(torch.equal(ident[k], state[k]) for k in state)  # exactly, not up to rounding


def test_unscaled_entries_keep_their_exact_value() -> None:
    w = torch.tensor([1e-20, 0.3, -0.7], dtype=F64)
    t = OffsetScale("w", torch.tensor([0, 1, 1]), 1, 1.0)  # index 1: unscaled (n = 1)
    new = {"w": w}
    t(new, torch.tensor([2.0, 1.0], dtype=F64))
    assert new["w"][0] == 2 * (1 + 1e-20) - 1 and torch.equal(new["w"][1:], w[1:])


@pytest.mark.parametrize("offset", [0.0, float("nan"), float("inf"), True, "1"])
def test_bad_offset_is_refused(offset) -> None:
    with pytest.raises(GaugeError, match="offset"):
        OffsetScale("w", torch.tensor([0]), 1, offset)


def test_bad_state_is_refused() -> None:
    t = OffsetScale("w", torch.tensor([0, 0, 1]), 1, 1.0)
    alpha = torch.tensor([2.0, 1.0], dtype=F64)
    with pytest.raises(GaugeError, match="no entry 'w'"):
        t({"v": torch.zeros(3, dtype=F64)}, alpha)
    with pytest.raises(GaugeError, match="does not broadcast"):
        t({"w": torch.zeros(4, dtype=F64)}, alpha)
    group = GaugeGroup((RescalingFactor("g", 1, terms=(t,)),), (), ("w",))
    with pytest.raises(GaugeError, match="positive"):
        group.act_state({"w": torch.zeros(3, dtype=F64)}, {"g": torch.tensor([-1.0], dtype=F64)})


def test_stream_rotation_conjugates_by_the_offset_gain() -> None:
    model, ids = seeded(OffsetStream), token_ids(40, 16, 5)
    group = gaugenet.symmetries(model, ids)
    (rot,) = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    conj = [t for t in rot.terms if isinstance(t, ConjugatedColumns)]
    assert conj and all(t.offset == 1 for t in conj)
    # by hand: O(4) (6), one scale per MLP unit (5), both effective gains per feature (8)
    assert rot.dim == 6 and group.dim == 19
    ref, gen = _out(model, ids), torch.Generator().manual_seed(3)
    for _ in range(3):
        assert relative_error(_out(group.act(model, group.sample(gen)), ids), ref) < 1e-13
    # negative: conjugating by the stored `w` instead of `1 + w` changes the outputs
    wrong = OrthogonalFactor(
        "wrong",
        4,
        terms=tuple(
            ConjugatedColumns(t.param, t.gain) if isinstance(t, ConjugatedColumns) else t
            for t in rot.terms
        ),
    )
    moved = copy.deepcopy(model)
    moved.load_state_dict(wrong.apply(model_state(model), rot.sample(gen)))
    assert relative_error(_out(moved, ids), ref) > 1e-2
    # the rotation and the gains' rescalings commute (the conjugation reads the gain)
    (g1,) = [f for f in group.factors if isinstance(f, RescalingFactor) and "w1" in f.params()]
    s, q, a = model_state(model), rot.sample(gen), g1.sample(gen)
    one, two = g1.apply(rot.apply(s, q), a), rot.apply(g1.apply(s, a), q)
    assert all(torch.allclose(one[k], two[k], rtol=1e-12, atol=1e-13) for k in s)


def test_gemma_causal_lm_is_complete() -> None:
    """A one-layer `GemmaForCausalLM` (untied head, float64): the gains of both norms and of
    the final norm (8 + 8 + 8), the MLP (16), query-key (8) and value-output (32) GL and the
    stream's O(8) (28) make 108, all of `n − rank J`."""
    cfg = transformers.GemmaConfig(
        vocab_size=24,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=6,
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    ids = token_ids(24, 40, 6)
    group = gaugenet.symmetries(model, {"input_ids": ids})
    assert group.dim == 108
    assert any(isinstance(f, OrthogonalFactor) for f in group.factors)
    with keep_float64():  # the norms compute in float32 otherwise: rounding hides the rank
        report = gaugenet.certify(model, {"input_ids": ids}, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0


def test_noether_charge_of_the_offset_gain_is_conserved() -> None:
    """The charge reads `(w + 1)²`: its gradient (an orbit tangent) is orthogonal to the
    gradient of any invariant loss, so gradient flow conserves it; the charge of the plain
    `w²` is not."""
    model, x = _rms()
    group = gaugenet.symmetries(model, x)
    f = _gain_factor(group)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict) -> torch.Tensor:
        return (torch.func.functional_call(model, p, (x,)) ** 2).sum()

    def charge(p: dict) -> torch.Tensor:
        return noether_charges(p, GaugeGroup((f,), (), tuple(p)))[f.name]

    g_loss = torch.func.grad(loss)(params)
    jac = torch.func.jacrev(charge)(params)  # per unit: (n, *shape)
    flat = torch.cat([g_loss[k].reshape(-1) for k in params])
    for i in range(f.n):
        tangent = torch.cat([jac[k][i].reshape(-1) for k in params])
        assert abs(float(tangent @ flat)) < 1e-10 * float(tangent.norm() * flat.norm())
    # negative: `w²` in place of `(w + 1)²` for unit 0
    wrong = {k: v.clone() for k, v in jac.items()}
    t = next(t for t in f.terms if isinstance(t, OffsetScale))
    i0 = int(t.index.reshape(-1)[0])
    wrong["w"][i0] = jac["w"][i0] * params["w"].detach() / (params["w"].detach() + 1)
    tangent = torch.cat([wrong[k][i0].reshape(-1) for k in params])
    assert abs(float(tangent @ flat)) > 1e-3 * float(tangent.norm() * flat.norm())


@pytest.mark.parametrize("gauge", ["balanced", "unit_in"])
def test_canonical_form_is_the_same_along_the_orbit(gauge: str) -> None:
    """The canonical gauges read the effective gain `1 + w`: a model and a moved copy
    canonicalize to the same weights (with the stored `w`, the balanced gauge did not)."""
    model, x = _rms()
    group = gaugenet.symmetries(model, x)
    moved = group.act(model, group.sample(torch.Generator().manual_seed(4)))
    one = gaugenet.canonicalize(model, gauge, example_inputs=x)
    two = gaugenet.canonicalize(moved, gauge, example_inputs=x)
    for a, b in zip(one.parameters(), two.parameters()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
