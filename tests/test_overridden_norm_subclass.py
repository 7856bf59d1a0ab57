"""Subclasses of atomic module types (`discovery/_subclass_atoms.py`): kept whole only where a
numerical check shows they compute their base's function; otherwise traced into, where a
LayerNorm whose gain is stored with an offset (`F.layer_norm(x, s, w + 1, β)`, Nemotron's
`LayerNorm1P`) is analyzed with the gain `w + 1` (`discovery/_offset_layernorm.py`), and a
lookup at computed indices (OPT's positions) or a linear map with more around it as the
table or map it reads (`discovery/_functional_layers.py`); a table times a constant number
(Gemma's `√d`) still starts a rotated stream."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._offset_layernorm import OffsetGainLayerNorm
from gaugenet.discovery._subclass_atoms import checked_subclasses, computes_base, same_function
from gaugenet.discovery._trace import atom_types, is_atomic
from gaugenet.groups._offset_scale import OffsetScale

F64 = torch.float64
V, T, D, H = 40, 5, 6, 10
#: float64 round-off of a small model's forward pass, with margin
TOL = 1e-12


class LayerNorm1P(nn.LayerNorm):
    """A LayerNorm whose gain is stored as `w` and applied as `1 + w`."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class PlainLinear(nn.Linear):
    """Overrides `forward` with the same function as `nn.Linear`'s (Falcon's `FalconLinear`)."""

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias


class DoubledLinear(nn.Linear):
    """Overrides `forward` with another function: twice `nn.Linear`'s."""

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * super().forward(x)


class Positions(nn.Embedding):
    """A table looked up at `cumsum(mask) − 1` (OPT's positional embedding, another
    signature than `nn.Embedding`'s)."""

    def forward(self, mask: Tensor) -> Tensor:
        return super().forward(torch.cumsum(mask, dim=1) - 1)


class Block(nn.Module):
    """Token and position tables into a residual stream, a pre-norm ReLU MLP on it, a final
    norm and a head; `norm` is the LayerNorm type (`nn.LayerNorm` or `LayerNorm1P`)."""

    def __init__(self, norm: type[nn.LayerNorm], linear: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln1, self.ln2 = norm(D), norm(D)
        self.up, self.down = linear(D, H), nn.Linear(H, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        h = h + self.down(torch.relu(self.up(self.ln1(h))))
        return self.head(self.ln2(h))


class Tables(nn.Module):
    """Token and position tables summed into a LayerNorm read by a head."""

    def __init__(self, pos: type[nn.Embedding]) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), pos(T, D)
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, ids: Tensor) -> Tensor:
        mask = torch.ones_like(ids)
        at = self.pos(mask) if isinstance(self.pos, Positions) else self.pos(mask.cumsum(1) - 1)
        return self.head(self.ln(self.tok(ids) + at))


def _model(norm: type[nn.LayerNorm], linear: type[nn.Linear] = nn.Linear) -> nn.Module:
    torch.manual_seed(0)
    model = Block(norm, linear).to(F64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("ln"):  # gains far from 0 (and from −1: `1 + w` far from 0)
                p.copy_(0.3 * torch.randn_like(p) + (0.5 if name.endswith("weight") else 0.0))
        model.up.bias.mul_(0.1)  # every hidden unit active on some tokens, not on others
    return model


def _ids() -> Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (120, T), generator=g)
    ids.view(-1)[:V] = torch.arange(V)
    return ids


def _internal(group: gaugenet.GaugeGroup) -> list:
    return [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]


def test_offset_gain_layernorm_is_traced_and_complete() -> None:
    model, x = _model(LayerNorm1P), _ids()
    group = gaugenet.symmetries(model, x)
    assert not _internal(group)
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete" and report.unexplained == 0
    assert report.worst_residual < 1e-12  # orbit tangents in ker J
    # the gains move as `α (w + 1) − 1`
    offsets = {
        t.param: t.offset for f in group.factors for t in f.terms if isinstance(t, OffsetScale)
    }
    assert offsets == {"ln1.weight": 1.0, "ln2.weight": 1.0}
    assert any(f.kind == "orthogonal" for f in group.factors)  # conjugated by `w + 1`
    # the same model with plain LayerNorms has a group of the same dimension
    assert group.dim == gaugenet.symmetries(_model(nn.LayerNorm), x).dim


def test_group_laws_on_the_offset_gain_layernorm() -> None:
    model, x = _model(LayerNorm1P), _ids()
    group = gaugenet.symmetries(model, x)
    gen = torch.Generator().manual_seed(2)
    g, h = group.sample(gen), group.sample(gen)
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, x) < TOL
    both = group.act(model, group.compose(g, h))
    twice = group.act(moved, h)
    for p, q in zip(twice.parameters(), both.parameters()):
        assert float((p - q).abs().max()) < TOL
    back = group.act(moved, group.inverse(g))
    for p, q in zip(back.parameters(), model.parameters()):
        assert float((p - q).abs().max()) < TOL


def test_plain_layernorm_action_breaks_the_offset_gain() -> None:
    """Negative: scaling the stored `w` as a plain LayerNorm's gain (`w ↦ α w`, what an
    atomic `LayerNorm1P` was analyzed as) changes the outputs; `α (w + 1) − 1` does not."""
    model, x = _model(LayerNorm1P), _ids()
    alpha = torch.linspace(0.6, 1.7, D, dtype=F64)
    for offset_aware, changed in ((True, False), (False, True)):
        m = _model(LayerNorm1P)
        with torch.no_grad():
            w = m.ln1.weight
            w.copy_((w + 1) * alpha - 1 if offset_aware else w * alpha)
            m.ln1.bias.mul_(alpha)
            m.up.weight.div_(alpha)
        err = gaugenet.invariance_error(model, m, x)
        assert (err > 1e-3) if changed else (err < TOL)


def test_same_function_tells_subclasses_apart() -> None:
    x = torch.randn(4, D, dtype=F64)
    assert not same_function(LayerNorm1P(D), nn.LayerNorm, (x,), {})
    assert same_function(PlainLinear(D, H), nn.Linear, (x,), {})
    assert not same_function(DoubledLinear(D, H), nn.Linear, (x,), {})  # negative
    mask = torch.ones(2, T, dtype=torch.long)
    assert not same_function(Positions(T + 2, D), nn.Embedding, (mask,), {})  # other indices


def test_verdicts_hold_within_a_discovery_only() -> None:
    model, x = _model(LayerNorm1P, PlainLinear), _ids()
    assert not is_atomic(model.up) and not is_atomic(model.ln1)  # outside: never trusted
    with checked_subclasses(model, ((x,), {}), atom_types()):
        assert computes_base(model.up) and is_atomic(model.up)
        assert not is_atomic(model.ln1)
        assert is_atomic(model.tok)  # an atomic type itself
    assert not computes_base(model.up)
    # the meta device: no values, nothing shown
    with torch.device("meta"):
        meta = Block(LayerNorm1P, PlainLinear)
    with checked_subclasses(meta, ((x,), {}), atom_types()):
        assert not is_atomic(meta.up)


@pytest.mark.parametrize("linear", [PlainLinear, DoubledLinear], ids=["same", "doubled"])
def test_linear_subclasses(linear: type[nn.Linear]) -> None:
    """A `Linear` subclass computing `nn.Linear`'s function is analyzed as one; one
    computing something else is traced into, where its `F.linear` is the `nn.Linear` it
    computes: both give the group of the model with `nn.Linear`, complete."""
    x = _ids()
    model = _model(nn.LayerNorm, linear)
    group = gaugenet.symmetries(model, x)
    assert not _internal(group)
    assert gaugenet.invariance_error(model, group.act(model, group.sample()), x) < TOL
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete"
    if linear is PlainLinear:
        assert group.dim == gaugenet.symmetries(_model(nn.LayerNorm), x).dim


def test_embedding_at_computed_indices_is_the_table_it_reads() -> None:
    """`Positions` (another signature) is traced into; its lookup is analyzed as the
    `nn.Embedding` it reads: the same group as a plain table looked up at the same
    indices, complete."""
    ids = _ids()
    torch.manual_seed(0)
    model = Tables(Positions).to(F64)
    plain = Tables(nn.Embedding).to(F64)
    plain.load_state_dict(model.state_dict())
    with checked_subclasses(model, ((ids,), {}), atom_types()):
        assert not is_atomic(model.pos)
    group = gaugenet.symmetries(model, ids)
    assert not _internal(group)
    assert group.dim == gaugenet.symmetries(plain, ids).dim
    assert any(f.name == "center:pos" for f in group.factors)  # the table's rows along 1
    report = gaugenet.certify(model, ids, group=group)
    assert report.verdict == "complete" and report.worst_residual < 1e-12


def test_view_of_the_offset_gain_layernorm_computes_the_module() -> None:
    """The view module stands for the traced module: same outputs on random inputs."""
    ln = LayerNorm1P(D).to(F64)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    view = OffsetGainLayerNorm(D).to(F64)
    view.weight, view.bias, view.gain_offset = ln.weight, ln.bias, 1.0
    x = torch.randn(7, D, dtype=F64)
    assert torch.allclose(view(x), ln(x), rtol=0, atol=TOL)


def _nemotron() -> tuple[nn.Module, dict[str, Tensor]]:
    import transformers

    cfg = transformers.NemotronConfig(
        vocab_size=24,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=6,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.NemotronModel(cfg).to(F64).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) / min(p.shape) ** 0.5)
            else:  # gains `1 + w` away from 0, shifts small
                p.copy_(
                    (0.3 if name.endswith("weight") else 0.1)
                    * torch.randn(p.shape, generator=gen, dtype=F64)
                )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 24, (40, 6), generator=g)
    ids.view(-1)[:24] = torch.arange(24)
    return model, {"input_ids": ids}


def test_nemotron_value_rows_kernel_is_in_the_orbit() -> None:
    """NemotronModel (`LayerNorm1P`, squared ReLU, partial rotary): no internal error, and
    the group's dimension is `n − rank J`; the kernel `1/(1 + w)` of the input LayerNorm on
    the bias-free value rows along `a = W_o⁻¹ 1` (the constant it adds leaves `o_proj` along
    `1`, which the next LayerNorms remove), built here by hand, lies in the orbit (the
    value-row shift along `1`, `test_value_row_shift.py`, read with the gain `1 + w`)."""
    from gaugenet.certify._functional_dimension import rank_of
    from gaugenet.certify._jacobian import flat_model, jacobian_of
    from gaugenet.certify._keywords import positional
    from gaugenet.certify._orbit import orbit_projector
    from gaugenet.discovery._float64 import keep_float64

    model, inputs = _nemotron()
    group = gaugenet.symmetries(model, inputs)
    assert not _internal(group)
    fm_model, fm_in = positional(model, inputs)
    with keep_float64():
        fm = flat_model(fm_model, fm_in)
        jac = jacobian_of(fm)
    n = sum(fm.sizes)
    rank = rank_of(jac, rtol=1e-9).rank
    assert n - rank == group.dim
    p = dict(model.named_parameters())
    u = 1 / (1 + p["layers.0.input_layernorm.weight"].detach())  # the effective gain's kernel
    w_o = p["layers.0.self_attn.o_proj.weight"].detach()
    a = torch.linalg.solve(w_o, torch.ones(8, dtype=F64))
    start = dict(zip(fm.names, torch.tensor([0, *fm.sizes]).cumsum(0).tolist()))
    rows = start["layers.0.self_attn.v_proj.weight"] + torch.arange(64)
    extra = torch.zeros(n, 1, dtype=F64)
    extra[rows, 0] = (a[:, None] * u[None, :]).reshape(-1)
    scale = float(jac.abs().max()) * float(extra.abs().max())
    assert float((jac @ extra).abs().max()) < 1e-10 * scale
    orbit = orbit_projector(model, group).basis()
    both = torch.cat([orbit, extra / extra.norm()], 1)
    assert int(torch.linalg.matrix_rank(orbit, rtol=1e-8)) == n - rank
    assert int(torch.linalg.matrix_rank(both, rtol=1e-8)) == n - rank
    # negative: the stored `w` in place of `1 + w` is no kernel direction
    wrong = torch.zeros_like(extra)
    wrong[rows, 0] = (a[:, None] / p["layers.0.input_layernorm.weight"].detach()).reshape(-1)
    assert float((jac @ wrong).abs().max()) > 1e-6 * float(jac.abs().max())


class ScaledTable(nn.Embedding):
    """A table whose rows are multiplied by a constant buffer (Gemma's `√d`: one number;
    or one number per feature)."""

    def __init__(self, rows: int, d: int, scale: Tensor) -> None:
        super().__init__(rows, d)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * self.scale


@pytest.mark.parametrize("per_feature", [False, True], ids=["number", "per-feature"])
def test_stream_through_a_scaled_table(per_feature: bool) -> None:
    """The traced table's rows times one constant number still start a rotated stream (the
    rotation commutes with it); times a constant per feature, which a rotation does not
    commute with, no rotation is claimed (negative)."""
    model, ids = _model(nn.LayerNorm), _ids()
    scale = torch.linspace(0.5, 2.0, D, dtype=F64) if per_feature else torch.tensor(2.0, dtype=F64)
    table = ScaledTable(V, D, scale).to(F64)
    table.weight = model.tok.weight
    model.tok = table
    group = gaugenet.symmetries(model, ids)
    assert not _internal(group)
    assert any(f.kind == "orthogonal" for f in group.factors) is not per_feature
    assert gaugenet.invariance_error(model, group.act(model, group.sample()), ids) < TOL


class SameAttention(nn.MultiheadAttention):
    """Overrides `forward` with `nn.MultiheadAttention`'s own function."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kw: object) -> tuple:
        return super().forward(q, k, v, **kw)


class HalfAttention(nn.MultiheadAttention):
    """Overrides `forward` with another function: half the attention's output."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kw: object) -> tuple:
        out, weights = super().forward(q, k, v, **kw)
        return 0.5 * out, weights


class Attend(nn.Module):
    def __init__(self, attn: type[nn.MultiheadAttention]) -> None:
        super().__init__()
        self.attn, self.head = attn(D, 2, batch_first=True), nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.attn(x, x, x, need_weights=False)[0]))


@pytest.mark.parametrize("attn", [SameAttention, HalfAttention], ids=["same", "half"])
def test_analyzers_take_no_class_as_proof(attn: type[nn.MultiheadAttention]) -> None:
    """A type's analyzer (`nn.MultiheadAttention`'s factors) describes a subclass only
    where the subclass computes that type's function; otherwise it is traced into and the
    group found there is checked (no internal error)."""
    from gaugenet.discovery._symmetries import _analyzer

    torch.manual_seed(0)
    model = Attend(attn).to(F64).eval()
    x = torch.randn(16, T, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    with checked_subclasses(model, ((x,), {}), (*atom_types(), nn.MultiheadAttention)):
        assert (_analyzer(model.attn) is not None) is (attn is SameAttention)
    group = gaugenet.symmetries(model, x)
    assert not _internal(group)
    assert gaugenet.invariance_error(model, group.act(model, group.sample()), x) < TOL
    if attn is SameAttention:
        plain = Attend(nn.MultiheadAttention).to(F64).eval()
        plain.load_state_dict(model.state_dict())
        assert group.dim == gaugenet.symmetries(plain, x).dim > 0
