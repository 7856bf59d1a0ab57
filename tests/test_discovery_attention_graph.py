"""Attention found from the graph pattern: per-head (or per key-value group) query-key and
value-output factors, the commutant of rotary embeddings, position biases per head."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.certify import functional_dimension
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.groups._algebra import AlgebraFactor, commutant_basis

F64 = torch.float64
V, T = 24, 6


def _llama(**extra) -> tuple[nn.Module, dict]:
    import transformers

    cfg = dict(
        vocab_size=V,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=T,
        use_cache=False,
    )
    cfg.update(extra)
    cls = cfg.pop("cls", "LlamaModel")
    config_cls = cfg.pop("config", "LlamaConfig")
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**cfg)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (40, T), generator=g)
    ids[0, :] = torch.arange(T)
    return model, {"input_ids": ids}


class _Positional(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).last_hidden_state


def _gap(model: nn.Module, inputs: dict) -> int:
    with warnings.catch_warnings(), keep_float64():
        warnings.simplefilter("ignore")
        fd = functional_dimension(_Positional(model), (inputs["input_ids"],))
    return fd.n_params - fd.rank


def _internal(group) -> list:
    return [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]


@pytest.mark.parametrize(
    "extra, dim",
    [
        ({}, 72),
        ({"num_attention_heads": 4, "num_key_value_heads": 2}, 44),
        ({"cls": "Qwen2Model", "config": "Qwen2Config"}, 72),
    ],
    ids=["llama", "llama-gqa", "qwen2-biases"],
)
def test_rotary_decoders_are_complete(extra, dim) -> None:
    model, inputs = _llama(**extra)
    group = gaugenet.symmetries(model, inputs)
    assert not _internal(group)
    assert group.dim == dim == _gap(model, inputs)
    qk = [f for f in group.factors if f.name.endswith(".qk")]
    assert qk and all(isinstance(f, AlgebraFactor) and f.basis is not None for f in qk)
    with keep_float64():
        moved = group.act(model, group.sample(torch.Generator().manual_seed(3)))
        assert gaugenet.invariance_error(model, moved, inputs) < 1e-10


def test_rotary_query_key_is_the_commutant_not_gl() -> None:
    """Under rotary embeddings a full `GL(d_head)` element changes the outputs; the factor
    keeps a scaling-rotation per rotated plane and refuses elements outside it."""
    model, inputs = _llama()
    group = gaugenet.symmetries(model, inputs)
    qk = next(f for f in group.factors if f.name.endswith(".qk"))
    assert qk.m == 4  # head_dim 4: two planes, each `a·I + b·J`
    full = AlgebraFactor(qk.name, qk.d, qk.b, terms=qk.terms)  # same action, all of GL
    g = full.sample(torch.Generator().manual_seed(0))
    with keep_float64():
        moved = model.__class__(model.config).double().eval()
        moved.load_state_dict(full.apply(dict(model.state_dict()), g))
        # eight orders of magnitude above the commutant elements' 1e-12 (one layer, residual)
        assert gaugenet.invariance_error(model, moved, inputs) > 1e-4
    with pytest.raises(gaugenet.GaugeError, match="not in the factor's algebra"):
        qk.validate(g)
    with pytest.raises(gaugenet.GaugeError, match="singular"):  # in the algebra, not a unit
        qk.validate(torch.zeros(qk.b, qk.d, qk.d, dtype=F64))


def test_commutant_of_plane_rotations() -> None:
    """Rotations of planes (0, 2) and (1, 3) at different frequencies plus a fixed axis 4."""
    mats = []
    for t in range(5):
        m = torch.eye(5, dtype=F64)
        for (i, j), w in (((0, 2), 1.0), ((1, 3), 0.3)):
            c, s = math.cos(w * t), math.sin(w * t)
            m[i, i] = m[j, j] = c
            m[i, j], m[j, i] = -s, s
        mats.append(m)
    basis = commutant_basis(torch.stack(mats))
    assert basis.shape[0] == 1 + 2 + 2
    for b in basis:
        for m in mats:
            assert torch.allclose(b @ m, m @ b, atol=1e-12)
    assert commutant_basis(torch.eye(3, dtype=F64).expand(4, 3, 3) * 2.0) is None
    # a generic matrix commutes with multiples of the identity only
    generic = torch.randn(3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert commutant_basis(generic).shape[0] == 1


class ManualAttention(nn.Module):
    """Attention written out by hand (matmul, scale, softmax, matmul) with a per-head
    position bias when `bias_table`."""

    def __init__(self, d: int = 8, heads: int = 2, bias_table: bool = False) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.pos = nn.Parameter(torch.randn(heads, T, T)) if bias_table else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(B, L, self.h, self.dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.dh)
        if self.pos is not None:
            s = s + self.pos
        a = torch.softmax(s, dim=-1)
        out = torch.matmul(a, v).transpose(1, 2).reshape(B, L, -1)
        return self.o(out)


@pytest.mark.parametrize("bias_table", [False, True], ids=["plain", "position-bias"])
def test_hand_written_attention(bias_table: bool) -> None:
    torch.manual_seed(0)
    model = ManualAttention(bias_table=bias_table).double()
    x = torch.randn(30, T, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    group = gaugenet.symmetries(model, x)
    assert not _internal(group)
    names = {f.name.rpartition(".")[2] for f in group.factors}
    assert {"qk", "vo", "key_shift", "value_shift"} <= names
    # heads may be permuted only when nothing per head is added to the scores
    assert ("heads" in names) == (not bias_table)
    # per head: GL(4) twice, key shift 4, value shift 4
    assert group.dim == 2 * (16 + 16 + 4 + 4)
    with warnings.catch_warnings(), keep_float64():
        warnings.simplefilter("ignore")
        fd = functional_dimension(model, (x,))
    # a position table added to the scores has one more redundancy per (head, query) row:
    # softmax ignores a constant over the keys; discovery does not find it yet
    missed = 2 * T if bias_table else 0
    assert group.dim + missed == fd.n_params - fd.rank
    moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))
    assert gaugenet.invariance_error(model, moved, x) < 1e-11


def _lm(tied: bool) -> tuple[nn.Module, dict]:
    return _llama(cls="LlamaForCausalLM", tie_word_embeddings=tied)


def test_rmsnorm_stream_rotation() -> None:
    """The residual stream of a Llama causal LM may be rotated: embedding `E Q`, writers
    `Qᵀ W`, readers `W diag(γ) Q diag(γ)⁻¹`. A general invertible matrix in its place changes
    the logits; a non-orthogonal element is refused; tied embeddings get no rotation."""
    model, inputs = _lm(tied=False)
    group = gaugenet.symmetries(model, inputs)
    assert not _internal(group)
    (rot,) = [f for f in group.factors if isinstance(f, gaugenet.groups.OrthogonalFactor)]
    assert rot.dim == 28 and "lm_head.weight" in rot.params()
    q = rot.sample(torch.Generator().manual_seed(0))
    with keep_float64():
        moved = group.act(model, {rot.name: q})
        assert gaugenet.invariance_error(model, moved, inputs) < 1e-10
        a = q + 0.3 * torch.randn(8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
        bad = model.__class__(model.config).double().eval()
        bad.load_state_dict(rot.apply(dict(model.state_dict()), a))
        assert gaugenet.invariance_error(model, bad, inputs) > 1e-3
    with pytest.raises(gaugenet.GaugeError, match="not orthogonal"):
        rot.validate(a)
    tied, tied_inputs = _lm(tied=True)
    tied_group = gaugenet.symmetries(tied, tied_inputs)
    assert not any(f.kind == "orthogonal" for f in tied_group.factors)


def test_stream_rotation_canonical_form_is_orbit_independent() -> None:
    """The rotation's gauge (principal axes of the embedding table), the rescalings it
    touches (pinned by unit columns of the writers, which the rotation only mixes by rows)
    and the head elements' balanced forms (rotary query-key, grouped value-output): two
    points of one orbit give the same canonical weights."""
    model, inputs = _lm(tied=False)
    group = gaugenet.symmetries(model, inputs)
    rot = next(f for f in group.factors if f.kind == "orthogonal")
    gen = torch.Generator().manual_seed(4)
    kinds = ("orthogonal", "rescaling", "gl")  # rotation, gains, rotary and GQA head elements
    g = {f.name: f.sample(gen) for f in group.factors if f.kind in kinds}
    with keep_float64():
        moved = group.act(model, g)
        a = gaugenet.canonicalize(model, group=group)
        b = gaugenet.canonicalize(moved, group=group)
        assert gaugenet.invariance_error(model, a, inputs) < 1e-10
    sa, sb = a.state_dict(), b.state_dict()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-8
    assert not torch.allclose(model.state_dict()[rot.table], moved.state_dict()[rot.table])


def test_gpt2_conv1d_attention() -> None:
    """GPT-2's Conv1D layers are `addmm(b, x, W)` with `W` `(in, out)`: its packed query-key-
    value projection is split into heads from the computation (paper orientation), and a
    tied language-model head keeps nothing that would move the shared table.

    GPT2Model: 247 = n − rank J (see the coverage table): query-key and value-output GL of 2
    heads (32 + 32), key and value bias shifts (8 + 8), the scales of ln_1 and ln_2 (8 + 8),
    their β moved into the Conv1D biases (8 + 8) and mean kernels in the Conv1D readers
    (24 + 32), the attention and MLP outputs along `1` that only LayerNorms read (9 + 33), and
    the token and position tables' rows along `1` (24 + 6) and moves between them (7). The
    tied head reads the token table, which loses its rows and the move (216)."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=V, n_embd=8, n_layer=1, n_head=2, n_positions=T, use_cache=False
    )
    torch.manual_seed(0)
    ids = torch.randint(0, V, (30, T), generator=torch.Generator().manual_seed(0))
    for cls, dim in ((transformers.GPT2Model, 247), (transformers.GPT2LMHeadModel, 216)):
        model = cls(cfg).double().eval()
        group = gaugenet.symmetries(model, {"input_ids": ids})
        assert not _internal(group)
        qk = next(f for f in group.factors if f.name.endswith("attn.qk"))
        assert qk.layout.orientation == "paper" and qk.dim == 2 * 16
        assert group.dim == dim
        with keep_float64():
            moved = group.act(model, group.sample(torch.Generator().manual_seed(1)))
            assert gaugenet.invariance_error(model, moved, {"input_ids": ids}) < 1e-10


def test_rotary_query_key_charge_is_conserved() -> None:
    """The Noether charge of the rotary commutant, `⟨B_k, W_q W_qᵀ − W_k W_kᵀ⟩` per basis
    matrix, stays put under gradient descent, while the same quadratic form read outside the
    algebra (what `GL(d_head)` would conserve) drifts."""
    from gaugenet.dynamics import noether_charges

    model0, inputs = _llama()
    group = gaugenet.symmetries(model0, inputs)
    qk = next(f for f in group.factors if f.name.endswith(".qk"))
    full = AlgebraFactor("full", qk.d, qk.b, terms=qk.terms)
    pair = dataclasses.replace(group, factors=(qk, full))
    ids = inputs["input_ids"][:8]
    target = torch.randn(8, T, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    c0 = noether_charges(model0, pair)
    assert c0[qk.name].shape == (qk.b, qk.m)
    model = model0.__class__(model0.config).double().eval()
    model.load_state_dict(model0.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=2e-2)
    for _ in range(200):
        opt.zero_grad()
        ((model(input_ids=ids).last_hidden_state - target) ** 2).mean().backward()
        opt.step()
    c = noether_charges(model, pair)
    kept = float((c[qk.name] - c0[qk.name]).abs().max())
    drift = float((c["full"] - c0["full"]).abs().max())
    assert drift > 3e-5 and kept < 1e-2 * drift  # measured here: 1.2e-4 and 3.6e-7


def test_gpt_neox_heads_packed_with_a_stride() -> None:
    """GPT-NeoX packs query, key and value per head in one projection (head `h`'s query at
    rows `3h·d`, ...) and rotates part of each head: the query-key factor acts on strided
    blocks, inside the commutant of the partial rotation."""
    import transformers

    cfg = transformers.GPTNeoXConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=T,
        rotary_pct=0.5,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXModel(cfg).double().eval()
    ids = {"input_ids": torch.randint(0, V, (30, T), generator=torch.Generator().manual_seed(0))}
    group = gaugenet.symmetries(model, ids)
    assert not _internal(group)
    qk = next(f for f in group.factors if f.name.endswith(".qk"))
    # head_dim 8, half rotated: GL(4) on the unrotated half, 2 planes of scaling-rotations
    assert qk.m == 16 + 2 * 2 and qk.terms[0].stride == 3
    with keep_float64():
        moved = group.act(model, group.sample(torch.Generator().manual_seed(1)))
        assert gaugenet.invariance_error(model, moved, ids) < 1e-10
    # the value-bias shift reads the strided value rows of the packed bias
    (vs,) = [f for f in group.factors if f.name.endswith(".value_shift")]
    assert vs.dim == 16 and vs.terms[0].stride == 3
    bias = "layers.0.attention.query_key_value.bias"
    u = torch.arange(1.0, 17.0, dtype=torch.float64)
    with keep_float64():
        shifted = group.act(model, {vs.name: u})
        assert gaugenet.invariance_error(model, shifted, ids) < 1e-10
        change = (shifted.get_parameter(bias) - model.get_parameter(bias)).reshape(2, 3, 8)
        assert torch.equal(change[:, 2].reshape(-1), u) and not change[:, :2].any()
        # negative: the shift put on the query rows instead changes the outputs
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            wrong.get_parameter(bias).view(2, 3, 8)[:, 0] += u.reshape(2, 8)
        assert gaugenet.invariance_error(model, wrong, ids) > 1e-3


def test_grouped_query_permutations() -> None:
    """Under grouped-query attention the key-value groups may be permuted (each with its
    query heads), and the query heads within a group; a query head moved to another group
    changes the outputs."""
    model, inputs = _llama(num_attention_heads=4, num_key_value_heads=2)
    group = gaugenet.symmetries(model, inputs)
    names = {f.name.rpartition(".")[2] for f in group.of_kind("permutation")}
    assert {"kv_groups", "heads[0]", "heads[1]"} <= names
    with keep_float64():
        for f in group.of_kind("permutation"):
            swap = torch.arange(f.n).flip(0)
            moved = group.act(model, {f.name: swap})
            assert gaugenet.invariance_error(model, moved, inputs) < 1e-10
        # query head 0 (group 0) exchanged with query head 2 (group 1)
        dh, q = 2, "layers.0.self_attn.q_proj.weight"
        o = "layers.0.self_attn.o_proj.weight"
        rows = torch.arange(4 * dh).reshape(4, dh)
        wrong = gaugenet.groups.PermutationFactor(
            "wrong",
            4,
            terms=(gaugenet.groups.PermTerm(q, 0, rows), gaugenet.groups.PermTerm(o, 1, rows)),
        )
        state = wrong.apply(dict(model.state_dict()), torch.tensor([2, 1, 0, 3]))
        bad = model.__class__(model.config).double().eval()
        bad.load_state_dict(state)
        assert gaugenet.invariance_error(model, bad, inputs) > 1e-4


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_value_bias_shift_under_rotary_and_grouped_queries(kv_heads, gen):
    """Rotary attention with value and output biases (StarCoder2): softmax weights sum to
    one, so a shift of each key-value head's value bias is taken back by the output bias
    (`b_o - W_o u`, `u` read by every query head of its group). Found, kept by random
    elements of the whole group, and its tangents lie in ker J. Under grouped queries the
    LayerNorm kernel and the output centering are kept too (they used to be dropped)."""
    import transformers

    cfg = transformers.Starcoder2Config(
        vocab_size=24,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8,
        use_bias=True,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.Starcoder2Model(cfg).double().eval()
    x = {"input_ids": torch.randint(0, 24, (6, 6), generator=gen)}
    group = gaugenet.symmetries(model, x)
    shifts = [f for f in group.factors if f.name.endswith("value_shift")]
    assert [f.dim for f in shifts] == [kv_heads * 4] * 2
    # the input LayerNorm's kernel (rows of q, k, v) and o_proj's outputs along 1 compose
    # with the query-key and value-output elements, repeated over a group's query heads
    dims = {f.name: f.dim for f in group.factors}
    for i in range(2):
        assert dims[f"ln_kernel:layers.{i}.input_layernorm"] == 8 + 2 * 4 * kv_heads
        assert dims[f"center:layers.{i}.self_attn.o_proj"] == 9
    for _ in range(3):
        moved = group.act(model, group.sample(gen))
        assert gaugenet.invariance_error(model, moved, x) < 1e-12
    # the composition law, where shifts are moved past the repeated blocks
    g, h = group.sample(gen), group.sample(gen)
    both = group.act(group.act(model, g), h)
    assert gaugenet.invariance_error(group.act(model, group.compose(g, h)), both, x) < 1e-12
    back = group.act(group.act(model, g), group.inverse(g))
    assert gaugenet.invariance_error(model, back, x) < 1e-12
    state, orig = dict(back.named_parameters()), dict(model.named_parameters())
    assert max(float((state[k] - orig[k]).abs().max()) for k in orig) < 1e-10
    report = gaugenet.certify(model, x["input_ids"], group=group, method="checks")
    assert report.verdict == "right" and report.worst_residual < 1e-12
    # negative: the value bias shifted without the output bias taking it back
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.layers[1].self_attn.v_proj.bias.add_(0.3)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3
