"""The offset group `{I + c 1ᵀ}` of a LayerNorm read by linear maps without a bias
(groups/_offset.py, discovery/_offset.py)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._offset import offset_factor
from gaugenet.groups import GaugeGroup, LayerNormOffsetFactor, model_state
from gaugenet.groups._offset import OffsetSlot

D = 5


class Readers(nn.Module):
    """`LN(x)` read by two linear maps without a bias and one with; with `residual`, also
    added to a constant and returned (a reader that is not linear)."""

    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.a = nn.Linear(D, 3, bias=False)
        self.b = nn.Linear(D, 4, bias=False)
        self.c = nn.Linear(D, 2)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.ln(x)
        out = (self.a(y), self.b(y), self.c(y))
        return (*out, y + 1.0) if self.residual else out


class Head(nn.Module):
    """Embedding, LayerNorm, a head without a bias: the stream has a rotation keeping `1`."""

    def __init__(self, vocab: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, 7, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.emb(ids)))


def _model(residual: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = Readers(residual).double()
    with torch.no_grad():
        m.ln.weight.copy_(torch.rand(D, dtype=torch.float64) + 0.5)
        m.ln.bias.copy_(torch.randn(D, dtype=torch.float64) + 0.3)
    return m.eval(), torch.randn(200, D, dtype=torch.float64)


def _head() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = Head().double()
    with torch.no_grad():
        m.ln.weight.copy_(torch.rand(D, dtype=torch.float64) + 0.5)
        m.ln.bias.copy_(torch.randn(D, dtype=torch.float64) + 0.3)
    ids = torch.arange(12).repeat(4).reshape(6, 8)
    return m.eval(), ids


def _offset(group: GaugeGroup) -> LayerNormOffsetFactor:
    (f,) = [f for f in group.factors if isinstance(f, LayerNormOffsetFactor)]
    return f


def _dist(a: dict, b: dict) -> float:
    return max(
        float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-300)
        for k in b
        if b[k].is_floating_point()
    )


def test_found_with_hand_counted_dimension_and_complete() -> None:
    """`d` scales of `γ, β` against the readers' columns, the kernel `1/γ` in the 2 rows of
    the biased reader, and the `d` offsets: 5 + 2 + 5 = 12 = n − rank J."""
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    f = _offset(group)
    assert f.dim == D and f.kind == "offset"
    modes = {(s.weight, s.mode) for s in f.offset.slots}
    assert modes == {("a.weight", "right"), ("b.weight", "right"), ("c.weight", "bias")}
    assert group.dim == D + 2 + D
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete" and report.unexplained == 0 and report.exact
    assert report.functional_dimension == report.n_params - 12
    # its tangents lie in ker J (float64, forward mode)
    assert report.tangent_residuals[f.name] < 1e-12
    # without it, the same count misses exactly d directions
    rest = GaugeGroup(tuple(g for g in group.factors if g is not f), (), group.param_names)
    assert gaugenet.certify(model, x, group=rest).unexplained == D


def test_random_elements_keep_outputs(gen) -> None:
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    f = _offset(group)
    for scale in (0.5, 2.0, 5.0):
        c = f.sample(gen, scale=scale)
        moved = group.act(model, {f.name: c})
        assert gaugenet.invariance_error(model, moved, x) < 1e-12
        # β really moves, and the readers without a bias turn
        assert not torch.allclose(moved.ln.bias, model.ln.bias)
        assert not torch.allclose(moved.a.weight, model.a.weight)
        assert torch.equal(moved.c.weight, model.c.weight)
    g = group.sample(gen)  # together with the rescalings, the kernel and the rest
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-12


@pytest.mark.parametrize("build", [_model, _head])
def test_group_laws(build, gen) -> None:
    """`act(act(m, g), h) == act(m, compose(g, h))` and `g⁻¹`, on whole elements."""
    model, x = build()
    group = gaugenet.symmetries(model, x)
    _offset(group)
    s = model_state(model)
    for _ in range(3):
        g, h = group.sample(gen, scale=1.0), group.sample(gen, scale=1.0)
        both = group.act_state(s, group.compose(g, h))
        assert _dist(group.act_state(group.act_state(s, g), h), both) < 1e-12
        back = group.act_state(group.act_state(s, g), group.inverse(g))
        assert _dist(back, s) < 1e-12
    f = _offset(group)
    c = f.sample(gen)
    assert torch.allclose(f.compose(c, f.inverse(c)), f.identity(), atol=1e-15)
    assert torch.equal(f.exp(torch.zeros(D, dtype=torch.float64)), f.identity())


def test_rotation_declared_and_needed(gen) -> None:
    """Under the stream rotation `Q` the offset moves to `Qᵀ c`: declared, the group laws
    hold (above); without the declaration they fail."""
    model, ids = _head()
    group = gaugenet.symmetries(model, ids)
    f = _offset(group)
    (rot,) = group.of_kind("orthogonal")
    assert f.moved_by == ((rot.name, "T"),)
    # a lookup table of 12 rows cannot show completeness; the factors are checked
    report = gaugenet.certify(model, ids, group=group)
    assert report.verdict != "wrong" and report.tangent_residuals[f.name] < 1e-12
    bare = GaugeGroup(
        tuple(dataclasses.replace(g, moved_by=()) if g is f else g for g in group.factors),
        (),
        group.param_names,
    )
    s = model_state(model)
    g, h = group.sample(gen), group.sample(gen)
    one = bare.act_state(bare.act_state(s, g), h)
    assert _dist(one, bare.act_state(s, bare.compose(g, h))) > 1e-3


def test_not_offered_for_a_nonlinear_reader(gen) -> None:
    """With `y + 1` returned, the same transformation changes the outputs, and discovery
    does not offer it (nor reports it: certify finds the model complete without it)."""
    model, x = _model(residual=True)
    group = gaugenet.symmetries(model, x)
    assert not any(isinstance(f, LayerNormOffsetFactor) for f in group.factors)
    slots = [
        OffsetSlot("a.weight", None, 0, 3),
        OffsetSlot("b.weight", None, 0, 4),
        OffsetSlot("c.weight", "c.bias", 0, 2, mode="bias"),
    ]
    f = offset_factor("ln", model.ln, slots)
    forced = GaugeGroup((f,), (), group.param_names)
    moved = forced.act(model, {f.name: f.sample(gen)})
    assert gaugenet.invariance_error(model, moved, x) > 1e-3
    # on the model without the residual reader the very same factor keeps the outputs
    plain, _ = _model()
    assert gaugenet.invariance_error(plain, forced.act(plain, {f.name: f.sample(gen)}), x) < 1e-12
    assert gaugenet.certify(model, x, group=group).verdict == "complete"


def test_negative_without_the_bias_or_the_turn(gen) -> None:
    """Each half of the action is needed: `β` moved with the turned rows but without the
    biased reader's compensation, or without turning the readers, changes the outputs."""
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    f = _offset(group)
    c = f.sample(gen)
    moved = group.act(model, {f.name: c})
    no_bias = group.act(model, {f.name: c})
    no_turn = group.act(model, {f.name: c})
    with torch.no_grad():
        no_bias.c.bias.copy_(model.c.bias)
        no_turn.a.weight.copy_(model.a.weight)
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    assert gaugenet.invariance_error(model, no_bias, x) > 1e-3
    assert gaugenet.invariance_error(model, no_turn, x) > 1e-3


def test_all_biased_readers_or_zero_sum_get_no_offset() -> None:
    """Every reader biased: the shift of `β` already moves it freely (no offset, still
    complete). `Σ β/γ = 0`: the orbit degenerates, no offset either."""
    model, x = _model()
    model.a = nn.Linear(D, 3).double()
    model.b = nn.Linear(D, 4).double()
    group = gaugenet.symmetries(model, x)
    assert not any(isinstance(f, LayerNormOffsetFactor) for f in group.factors)
    assert gaugenet.certify(model, x, group=group).verdict == "complete"
    model, x = _model()
    with torch.no_grad():
        bt = model.ln.bias / model.ln.weight
        model.ln.bias.copy_((bt - bt.mean()) * model.ln.weight)
    group = gaugenet.symmetries(model, x)
    assert not any(isinstance(f, LayerNormOffsetFactor) for f in group.factors)


def test_canonical_form_is_orbit_independent(gen) -> None:
    """The canonical offset makes `β / γ = ±1`, the same from every point of the orbit."""
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    f = _offset(group)
    ref = gaugenet.canonicalize(model, group=group)
    bt = (ref.ln.bias / ref.ln.weight).detach()
    assert torch.allclose(bt.abs(), torch.ones(D, dtype=torch.float64), atol=1e-12)
    assert gaugenet.invariance_error(model, ref, x) < 1e-10
    other = group.act(model, {**group.sample(gen, discrete=False), f.name: f.sample(gen)})
    again = gaugenet.canonicalize(other, group=group)
    assert _dist(model_state(again), model_state(ref)) < 1e-9


def test_bad_elements_refused() -> None:
    model, x = _model()
    f = _offset(gaugenet.symmetries(model, x))
    bad = {
        "1 + 1ᵀc": torch.full((D,), -0.2, dtype=torch.float64),
        "shape": torch.zeros(D + 1, dtype=torch.float64),
        "not finite": torch.tensor([0.0, float("nan"), 0, 0, 0], dtype=torch.float64),
    }
    for what, c in bad.items():
        with pytest.raises(gaugenet.GaugeError, match=re.escape(what)):
            f.validate(c)
    with pytest.raises(gaugenet.GaugeError, match=re.escape("1 + 1ᵀc > 0")):
        f.inverse(torch.full((D,), -0.2, dtype=torch.float64))
    group = gaugenet.symmetries(model, x)
    with pytest.raises(gaugenet.GaugeError):
        group.act(model, {f.name: torch.full((D,), -1.0, dtype=torch.float64)})


class Attention(nn.Module):
    """`LN(x)` as query, key and value of a bias-free `nn.MultiheadAttention`."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.att = nn.MultiheadAttention(4, 2, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        return self.att(y, y, y, need_weights=False)[0]


def test_packed_attention_keys_left_alone(gen) -> None:
    """Query and value rows turn; the key rows stay (a constant on every key changes no
    softmax), where the kernel `1/γ` lives: 4 scales + 4 kernel rows + 4 offsets + 2 × 8
    head GLs, complete, and no factor dropped by the self-check."""
    torch.manual_seed(0)
    model = Attention().double().eval()
    with torch.no_grad():
        model.ln.weight.copy_(torch.rand(4, dtype=torch.float64) + 0.5)
        model.ln.bias.copy_(torch.randn(4, dtype=torch.float64))
    x = torch.randn(40, 5, 4, dtype=torch.float64)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    f = _offset(group)
    rows = [(s.start, s.stop, s.mode) for s in f.offset.slots]
    assert rows == [(0, 4, "right"), (8, 12, "right")]
    assert group.dim == 4 + 4 + 4 + 16
    assert gaugenet.certify(model, x, group=group).verdict == "complete"
    moved = group.act(model, group.sample(gen, scale=1.0))
    assert gaugenet.invariance_error(model, moved, x) < 1e-12


class Softmax(nn.Module):
    """A bias-free reader whose outputs a softmax reads: what it adds along `1` is free
    (`W += 1 aᵀ`, a centering), which does not commute with the offset."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.lin = nn.Linear(D, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.lin(self.ln(x)), dim=-1)


def test_left_out_where_its_composition_is_not_declared() -> None:
    """The centering of the reader's rows and the offset do not commute (the centering's
    `a` would move by `diag(γ)⁻¹ gᵀ diag(γ)`, which no declaration expresses): the centering
    is kept, the offset left out, and certify reports its `d` directions as missing."""
    torch.manual_seed(0)
    model = Softmax().double().eval()
    with torch.no_grad():
        model.ln.weight.copy_(torch.rand(D, dtype=torch.float64) + 0.5)
        model.ln.bias.copy_(torch.randn(D, dtype=torch.float64))
    x = torch.randn(300, D, dtype=torch.float64)
    group = gaugenet.symmetries(model, x)
    assert [f.name for f in group.factors] == ["scale:ln:out", "center:lin"]
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "incomplete" and report.unexplained == D and not report.wrong
