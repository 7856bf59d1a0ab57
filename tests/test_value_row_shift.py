"""Value rows without a bias that read a LayerNorm have a bias all the same: `(1/γ)ᵀ y = s =
Σ β/γ` at every token, so `W_v[rows] += (u/s)(1/γ)ᵀ` adds `u` to every value; softmax
weights sum to one, so the output projection sees the constant `W_o u`, which a bias takes
back: the output projection's own (GPT-Neo) or that of the MLP summed with it in a parallel
block (GPT-J, CodeGen), found in the graph (`discovery/_value_row_shift.py`).

Float64 counts against `n − rank J` (GPT-J, CodeGen, GPT-Neo complete), invariance of random
group elements, the factor's tangents in `ker J`, group laws, the commutation with the
LayerNorm's offset that the `1/s` coordinates buy, and negatives: without the compensation,
along another direction than `1/γ`, or without the factor the outputs move or the count falls
short; no factor where nothing takes the constant back (and not only LayerNorms read it) or
the LayerNorm has no `β`.

StableLM and Nemotron have no bias downstream: only `u` with `P W_o u = 0` holds there (the
constant `∝ 1`, which the following LayerNorms remove), one line, whose vector `V` is built
from `P W_o` and the value rows in `1^⊥` so that the centered-output factor (`W_o ↦ W_o +
1 aᵀ`) keeps it; the value-output `GL` and the stream rotations flip it with the sign of their
determinant (`discovery/_value_row_one.py`). Both complete; negatives: another `u`, or the
shift without its declared sign, is left out or moves the outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.certify._functional_dimension import rank_of
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.certify._keywords import positional
from gaugenet.certify._orbit import orbit_projector
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.discovery._value_row_shift import ValueRowShiftFactor, link_value_row_shifts
from gaugenet.discovery.rules._examples import batch, seeded
from gaugenet.groups import GaugeGroup, model_state
from gaugenet.groups._algebra import AlgebraFactor
from gaugenet.groups._offset import LayerNormOffsetFactor
from tiny_hf import unit_gain

T, E = 6, 8


def _randomize(model: nn.Module) -> nn.Module:
    return unit_gain(model.double().eval(), torch.Generator().manual_seed(0), bias=0.1)


def _ids(batch: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch * T,), generator=gen)
    ids[:vocab] = torch.arange(vocab)  # every token, several times
    return {"input_ids": ids[torch.randperm(ids.numel(), generator=gen)].reshape(batch, T)}


def _parallel(cls: str, cfg: str, **extra):
    """A parallel block (GPT-J's layout): its MLP sees one input row per token, so 128 ids,
    each several times, keep its parameters from fitting the batch."""
    import transformers

    config = getattr(transformers, cfg)(
        vocab_size=128, n_embd=E, n_layer=1, n_head=2, rotary_dim=2, n_positions=T, **extra
    )
    return _randomize(getattr(transformers, cls)(config)), _ids(96, 128)


def _gptj():
    return _parallel("GPTJModel", "GPTJConfig", use_cache=False)


def _codegen():
    return _parallel("CodeGenModel", "CodeGenConfig", n_ctx=T, use_cache=False)


def _gptneo():
    import transformers

    cfg = transformers.GPTNeoConfig(
        vocab_size=24,
        hidden_size=E,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        max_position_embeddings=T,
        use_cache=False,
    )
    return _randomize(transformers.GPTNeoModel(cfg)), _ids(40, 24)


def _stablelm():
    import transformers

    cfg = transformers.StableLmConfig(
        vocab_size=24,
        hidden_size=E,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=T,
        partial_rotary_factor=0.5,
        use_cache=False,
    )
    return _randomize(transformers.StableLmForCausalLM(cfg)), _ids(40, 24)


#: builder, the bias that takes the constant back
COMPLETE = {
    "gptj": (_gptj, "h.0.mlp.fc_out.bias"),
    "codegen": (_codegen, "h.0.mlp.fc_out.bias"),
    "gptneo": (_gptneo, "h.0.attn.attention.out_proj.bias"),
}


def _out(model: nn.Module, x) -> Tensor:
    with torch.no_grad(), keep_float64():
        return model(**x)[0] if isinstance(x, dict) else model(x)


def _jacobian(model: nn.Module, x):
    """`(J, names, starts, n − rank J)` on `x`, float64 throughout (`rtol = 1e-9`)."""
    flat_m, flat_in = positional(model, x)
    with keep_float64():
        fm = flat_model(flat_m, flat_in)
        jac = jacobian_of(fm)
    n = sum(fm.sizes)
    return jac, fm.names, fm.offsets(), n - rank_of(jac, rtol=1e-9).rank


def _shifts(group: GaugeGroup) -> list[ValueRowShiftFactor]:
    return [f for f in group.factors if isinstance(f, ValueRowShiftFactor)]


def _with(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A copy of `model` holding `state`'s parameters."""
    out = type(model)(model.config).double().eval()
    out.load_state_dict({**model.state_dict(), **state})
    return out


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _tangents(f: ValueRowShiftFactor, state: dict, names: list, starts: dict, n: int) -> Tensor:
    """`(n, dim)`: the factor's tangents at the identity (its action is affine in `u`, so
    the difference along each unit vector is the tangent exactly)."""
    cols = []
    for e in torch.eye(f.dim, dtype=torch.float64):
        new = f.apply(state, e)
        col = torch.zeros(n, dtype=torch.float64)
        for k in f.params():
            d = (new[k] - state[k]).reshape(-1)
            col[starts[k] : starts[k] + d.numel()] = d
        cols.append(col)
    return torch.stack(cols, 1)


@pytest.mark.parametrize("case", sorted(COMPLETE))
def test_value_rows_are_complete(case: str) -> None:
    build, bias = COMPLETE[case]
    model, x = build()
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    (f,) = _shifts(group)
    assert f.dim == 8 and f.shift.bias == bias  # 2 heads × 4 value rows
    jac, names, starts, nullity = _jacobian(model, x)
    assert group.dim == nullity
    # the orbit spans ker J; without the factor it misses exactly its 8 directions
    rest = GaugeGroup(tuple(g for g in group.factors if g is not f), (), group.param_names)
    assert orbit_projector(model, group).rank == nullity
    assert orbit_projector(model, rest).rank == nullity - 8
    # tangents in ker J
    state = {k: v.double() for k, v in _params(model).items()}
    tan = _tangents(f, state, names, starts, jac.shape[1])
    scale = float(jac.abs().max()) * float(tan.abs().max())
    assert float((jac @ tan).abs().max()) < 1e-10 * scale
    # random group elements, and large elements of the factor alone
    ref, gen = _out(model, x), torch.Generator().manual_seed(2)
    for _ in range(3):
        assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-10
    alone = GaugeGroup((f,), (), group.param_names)
    for _ in range(3):
        g = {f.name: 5 * f.sample(gen)}
        assert relative_error(_out(alone.act(model, g, check=False), x), ref) < 1e-10


@pytest.mark.parametrize("case", ["gptj", "gptneo"])
def test_the_move_without_its_compensation_changes_the_outputs(case: str) -> None:
    """Negative: the same rows moved without the bias change (so the constant `W_o u`
    stays on the stream), or along a random direction instead of `1/γ` (so the values move
    by more than a constant), change the outputs."""
    build, bias = COMPLETE[case]
    model, x = build()
    (f,) = _shifts(gaugenet.symmetries(model, x))
    state, ref = _params(model), _out(model, x)
    u = f.sample(torch.Generator().manual_seed(3))
    moved = f.apply(state, u)
    assert relative_error(_out(_with(model, moved), x), ref) < 1e-10
    uncompensated = {**moved, bias: state[bias]}
    assert relative_error(_out(_with(model, uncompensated), x), ref) > 1e-4
    # along another direction: `γ` read as a random vector, the same compensation
    t = f.shift
    other = dict(state)
    other[f"{t.ln}.weight"] = torch.randn(E, generator=torch.Generator().manual_seed(4)).double()
    wrong = f.apply(other, u)
    wrong = {k: wrong[k] for k in (t.value, t.bias)}
    assert relative_error(_out(_with(model, {**state, **wrong}), x), ref) > 1e-4


def test_the_coordinates_commute_with_the_layernorm_offset() -> None:
    """The shift and the offset of the LayerNorm its rows read act in either order alike
    (`1/s` absorbs the offset's `1 + 1ᵀc`); the same move written without `1/s` (the
    constant `s u` for a fixed `u`, compensated by `s W_o u`) does not commute: the offset
    scales it."""
    model, x = _gptj()
    group = gaugenet.symmetries(model, x)
    (f,) = _shifts(group)
    (off,) = [g for g in group.factors if isinstance(g, LayerNormOffsetFactor)]
    assert off.offset.ln == f.shift.ln
    state = {k: v.double() for k, v in model_state(model).items()}
    gen = torch.Generator().manual_seed(6)
    u, c = f.sample(gen), off.sample(gen)

    def naive(s: dict) -> dict:
        # `W_v[rows] += u ⊗ (1/γ)`, `bias −= s W_o u`: `f` at `s u`, with `s` read on `s`
        inv, sums = f.shift.coordinates(s, torch.float64)
        return f.apply(s, u * sums)

    for act, commutes in (((lambda s: f.apply(s, u)), True), (naive, False)):
        one, two = off.apply(act(state), c), act(off.apply(state, c))
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert (diff < 1e-10) if commutes else (diff > 1e-3)


def test_group_laws_with_the_rest_of_the_group() -> None:
    """`act(act(m, g), h) == act(m, compose(g, h))` and `g⁻¹` undoes `g` (the shift moved by
    the value-output `GL`, commuting with the offset, rescalings and centered outputs)."""
    model, x = _gptj()
    group = gaugenet.symmetries(model, x)
    gen = torch.Generator().manual_seed(4)
    g, h = group.sample(gen), group.sample(gen)
    twice = model_state(group.act(group.act(model, g), h))
    once = model_state(group.act(model, group.compose(g, h)))
    back = model_state(group.act(group.act(model, g), group.inverse(g)))
    start = model_state(model)
    for k in start:
        assert torch.allclose(twice[k], once[k], rtol=1e-10, atol=1e-10)
        assert torch.allclose(back[k], start[k], rtol=1e-10, atol=1e-10)


def test_a_shift_that_does_not_compose_is_left_out() -> None:
    """Negative: without its declared move by the value-output `GL` the shift does not
    compose with it, and the link leaves it out; as declared it is kept."""
    model, x = _gptneo()
    group = gaugenet.symmetries(model, x)
    (f,) = _shifts(group)
    undeclared = dataclasses.replace(f, moved_by=())
    others = [g for g in group.factors if g is not f]
    assert _shifts(GaugeGroup(tuple(link_value_row_shifts([*others, f], model)), (), ()))
    assert not _shifts(
        GaugeGroup(tuple(link_value_row_shifts([*others, undeclared], model)), (), ())
    )


class PreLN(nn.Module):
    """A LayerNorm, then attention (2 heads of 4) whose value rows have no bias, added to
    the residual with (`parallel`) an MLP on the same normalized input, then a readout."""

    def __init__(self, *, o_bias: bool, parallel: bool, ln_bias: bool = True) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8, bias=ln_bias)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.v = nn.Linear(8, 8, bias=False)
        self.o = nn.Linear(8, 8, bias=o_bias)
        self.fc = nn.Linear(8, 8) if parallel else None
        self.head = nn.Linear(8, 3)

    def _heads(self, y: Tensor) -> Tensor:
        B, T, _ = y.shape
        return y.view(B, T, 2, 4).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        a = torch.softmax(q @ k.transpose(-2, -1) / 2, dim=-1) @ v
        y = x + self.o(a.transpose(1, 2).reshape(x.shape))
        if self.fc is not None:
            y = y + self.fc(h)
        return self.head(y)


def _pre_ln(**kw) -> tuple[nn.Module, Tensor]:
    model = seeded(lambda: PreLN(**kw)).double()
    with torch.no_grad():
        model.ln.weight.copy_(1 + 0.3 * torch.randn(8, generator=torch.Generator().manual_seed(7)))
        if model.ln.bias is not None:
            model.ln.bias.copy_(0.2 * torch.randn(8, generator=torch.Generator().manual_seed(8)))
    return model, batch(16, 6, 8).double()


@pytest.mark.parametrize(
    "kw,bias",
    [
        (dict(o_bias=True, parallel=False), "o.bias"),
        (dict(o_bias=False, parallel=True), "fc.bias"),
        # nothing takes the constant back, and a linear readout sees it along `1` too
        (dict(o_bias=False, parallel=False), None),
        (dict(o_bias=True, parallel=False, ln_bias=False), None),  # no `β`: no constant
    ],
)
def test_found_from_the_graph(kw: dict, bias: str | None) -> None:
    model, x = _pre_ln(**kw)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    shifts = _shifts(group)
    assert [f.shift.bias for f in shifts] == ([bias] if bias else [])
    ref, gen = _out(model, x), torch.Generator().manual_seed(9)
    for f in shifts:
        alone = GaugeGroup((f,), (), group.param_names)
        g = {f.name: 3 * f.sample(gen)}
        assert relative_error(_out(alone.act(model, g, check=False), x), ref) < 1e-10
        # negative: the compensation left out moves the readout
        state = _params(model)
        moved = {**f.apply(state, g[f.name]), bias: state[bias]}
        bad = seeded(lambda: PreLN(**kw)).double()
        bad.load_state_dict(moved)
        assert relative_error(_out(bad, x), ref) > 1e-4


def _nemotron():
    import transformers

    cfg = transformers.NemotronConfig(
        vocab_size=24,
        hidden_size=E,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=T,
        use_cache=False,
    )
    return _randomize(transformers.NemotronModel(cfg)), _ids(40, 24)


@pytest.mark.parametrize("build", [_stablelm, _nemotron])
def test_the_direction_along_one_is_complete(build) -> None:
    """No bias takes the constant back: the one shift along `u ∝ V` (`P W_o V = 0`) closes
    the count; its tangent lies in `ker J`, and the same rows moved along another `u` do
    not (negative)."""
    model, x = build()
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    (f,) = _shifts(group)
    assert f.dim == 1 and {m[1] for m in f.moved_by} == {"sign"}
    jac, names, starts, nullity = _jacobian(model, x)
    assert group.dim == nullity
    rest = GaugeGroup(tuple(g for g in group.factors if g is not f), (), group.param_names)
    assert orbit_projector(model, rest).rank == nullity - 1
    state = {k: v.double() for k, v in _params(model).items()}
    tan = _tangents(f, state, names, starts, jac.shape[1])
    scale = float(jac.abs().max()) * float(tan.abs().max())
    assert float((jac @ tan).abs().max()) < 1e-10 * scale
    # `P W_o V = 0`: the constant reaches the stream along `1` only
    t = f.shift
    v = t.direction(state, torch.float64)
    w_o = state[t.weight]
    assert float((w_o @ v - (w_o @ v).mean()).abs().max()) < 1e-10 * float((w_o @ v).abs().max())
    # negative: the rows moved along another `u` (the entries of `V` reversed)
    moved = dict(state)
    dataclasses.replace(t, rows=t.rows[::-1])(moved, torch.ones(1, dtype=torch.float64))
    ref = _out(model, x)
    assert relative_error(_out(_with(model, moved), x), ref) > 1e-4
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-10
    # group laws with the value-output `GL` and the stream rotation (the sign declared)
    g, h = group.sample(gen), group.sample(gen)
    twice = model_state(group.act(group.act(model, g), h))
    once = model_state(group.act(model, group.compose(g, h)))
    for k in twice:
        assert torch.allclose(twice[k], once[k], rtol=1e-10, atol=1e-10)
    # a value-output element of negative determinant flips `V`: `t` moves to `−t` past it
    # (the declared sign); moved as it is, the two orders differ (negative)
    declared = {m[0] for m in f.moved_by}
    vo = next(g for g in group.factors if g.name in declared and isinstance(g, AlgebraFactor))
    fv = dataclasses.replace(f, moved_by=tuple(m for m in f.moved_by if m[0] == vo.name))
    flip = vo.identity(torch.float64).clone()
    flip[0, 0] = -flip[0, 0]
    u = torch.ones(1, dtype=torch.float64)
    one = vo.apply(f.apply(state, u), flip)
    after = GaugeGroup((vo, fv), (), ())._rescale_shift(fv, u, {vo.name: flip})
    assert float(after) == -1.0
    for v, same in ((after, True), (u, False)):
        two = f.apply(vo.apply(state, flip), v)
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert (diff < 1e-10) if same else (diff > 1e-3)
