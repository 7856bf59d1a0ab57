"""Attention on heads folded into the batch: queries, keys and values as
`(batch·heads, tokens, dim)`, scores from `torch.bmm` or `torch.baddbmm` with a per-head
position bias (ALiBi), as BLOOM writes it. The query-key and value-output GL, the key-bias
and value-bias shifts are found; head permutations are not offered when the bias differs
between heads. Float64 invariance, counts against `n − rank J`, group laws, negatives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.attention._factors import HeadPermFactor, KeyShiftFactor, ValueShiftFactor
from gaugenet.certify import Verdict
from gaugenet.certify._attribute import span
from gaugenet.certify._functional_dimension import rank_of
from gaugenet.certify._jacobian import FlatModel, flat_model, jacobian_of
from gaugenet.certify._keywords import positional
from gaugenet.certify._orbit import orbit_projector
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.discovery.rules._examples import batch, seeded, token_ids
from gaugenet.groups import PermutationFactor, model_state
from tiny_hf import unit_gain

D, H = 8, 2  # model width, heads (head size 4)
F64 = torch.float64


class FoldedAttention(nn.Module):
    """Self-attention whose heads are folded into the batch (batch major), scores
    `α·Q Kᵀ` from `bmm`, or `β·bias + α·Q Kᵀ` from `baddbmm` with the ALiBi bias
    `slope_h · s` for key position `s` when `slopes` is given."""

    def __init__(self, slopes: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.alibi = slopes is not None
        self.register_buffer("slopes", torch.tensor(slopes or (0.0,) * H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        dh = D // H

        def fold(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, H, dh).transpose(1, 2).reshape(b * H, t, dh)

        q, k, v = fold(self.q(x)), fold(self.k(x)), fold(self.v(x))
        if self.alibi:
            pos = torch.arange(t, dtype=x.dtype)
            bias = (self.slopes[:, None, None] * pos).repeat(b, 1, 1)  # (b·H, 1, t)
            s = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=dh**-0.5)
        else:
            s = torch.bmm(q, k.transpose(1, 2)) * dh**-0.5
        p = torch.softmax(s, dim=-1)
        a = torch.bmm(p, v).view(b, H, t, dh).transpose(1, 2).reshape(b, t, D)
        return self.o(a)


def _model(slopes: tuple[float, ...] | None = None) -> tuple[nn.Module, torch.Tensor]:
    return seeded(lambda: FoldedAttention(slopes)), batch(16, 5, D)


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _factor(group, suffix: str):
    return next(f for f in group.factors if f.name.endswith(suffix))


@pytest.mark.parametrize("slopes", [None, (0.5, 0.25)])
def test_folded_attention_is_found_and_complete(slopes) -> None:
    model, x = _model(slopes)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    # by hand, 2 heads of 4: query-key GL(4) per head (32), value-output GL(4) per head
    # (32), the key bias (8, a constant per query that the softmax removes), the value bias
    # moved into the output bias (8)
    assert group.dim == 80
    assert _factor(group, "qk").dim == 32 and _factor(group, "vo").dim == 32
    assert any(isinstance(f, KeyShiftFactor) and f.dim == 8 for f in group.factors)
    assert any(isinstance(f, ValueShiftFactor) and f.dim == 8 for f in group.factors)
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
    assert report.n_params - report.functional_dimension == 80


@pytest.mark.parametrize("slopes", [None, (0.5, 0.25)])
def test_random_elements_keep_outputs_float64(slopes) -> None:
    model, x = _model(slopes)
    group = gaugenet.symmetries(model, x)
    ref, gen = _out(model, x), torch.Generator().manual_seed(0)
    for _ in range(3):
        assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-12


def test_group_laws_of_query_key() -> None:
    model, x = _model((0.5, 0.25))
    qk = _factor(gaugenet.symmetries(model, x), "qk")
    state, gen = model_state(model), torch.Generator().manual_seed(1)
    a, b = qk.sample(gen), qk.sample(gen)

    def close(s: dict, t: dict) -> bool:
        return all(torch.allclose(s[k], t[k], rtol=1e-12, atol=1e-12) for k in s)

    assert close(qk.apply(qk.apply(state, a), b), qk.apply(state, qk.compose(a, b)))
    assert close(qk.apply(qk.apply(state, a), qk.inverse(a)), state)


def test_query_key_element_on_queries_only_changes_outputs() -> None:
    """Negative: `W_q ↦ Gᵀ W_q` without `W_k ↦ G⁻¹ W_k` is no symmetry."""
    model, x = _model((0.5, 0.25))
    qk = _factor(gaugenet.symmetries(model, x), "qk")
    g = qk.sample(torch.Generator().manual_seed(2))
    moved = qk.apply(model_state(model), g)
    half = copy.deepcopy(model)
    state = model_state(model)
    state.update({k: moved[k] for k in ("q.weight", "q.bias")})
    half.load_state_dict(state)
    assert not torch.equal(half.q.weight, model.q.weight)
    assert relative_error(_out(half, x), _out(model, x)) > 1e-3


def _swap_heads(model: nn.Module) -> nn.Module:
    """Heads 0 and 1 exchanged in every projection (the bias buffer left as it is)."""
    out, dh = copy.deepcopy(model), D // H
    perm = torch.cat([torch.arange(dh, 2 * dh), torch.arange(dh)])
    with torch.no_grad():
        for lin in (out.q, out.k, out.v):
            lin.weight.copy_(lin.weight[perm])
            lin.bias.copy_(lin.bias[perm])
        out.o.weight.copy_(out.o.weight[:, perm])
    return out


def test_head_permutation_only_without_per_head_bias() -> None:
    """Without a position bias the heads permute (offered, and a symmetry); with ALiBi's
    per-head slopes, exchanging the heads but not their slopes changes the outputs, and no
    head permutation is offered."""
    plain, x = _model()
    group = gaugenet.symmetries(plain, x)
    assert any(isinstance(f, (HeadPermFactor, PermutationFactor)) for f in group.factors)
    assert relative_error(_out(_swap_heads(plain), x), _out(plain, x)) < 1e-13
    alibi, _ = _model((0.5, 0.25))
    group = gaugenet.symmetries(alibi, x)
    perms = [f for f in group.factors if isinstance(f, (HeadPermFactor, PermutationFactor))]
    assert not [f for f in perms if "q.weight" in f.params()]
    assert relative_error(_out(_swap_heads(alibi), x), _out(alibi, x)) > 1e-3


# -- BLOOM -----------------------------------------------------------------------------------
V, T = 24, 6  # vocabulary, tokens


def _bloom() -> nn.Module:
    """A one-layer `BloomModel` (hidden 8, 2 heads of 4, ALiBi), float64: unit-gain
    matrices, norm gains near 1, small biases (no parameter special)."""
    import transformers

    cfg = transformers.BloomConfig(vocab_size=V, hidden_size=8, n_layer=1, n_head=2)
    model = transformers.BloomModel(cfg).double().eval()
    assert all(p.ndim <= 2 for p in model.parameters())
    return unit_gain(model, torch.Generator().manual_seed(0), bias=0.1)


def _kernel_dim(model: nn.Module, inputs: dict) -> tuple[int, torch.Tensor, FlatModel]:
    """`(n − rank J, J, flat model)` on `inputs` (float64, relative rank tolerance 1e-9)."""
    with keep_float64():
        fm = flat_model(*positional(model, inputs))  # keyword inputs as positional ones
        jac = jacobian_of(fm)
        rank = rank_of(jac, rtol=1e-9).rank
    return int(fm.theta.numel()) - rank, jac, fm


def _bloom_attention_factors(group) -> None:
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    pre = "h.0.self_attention."
    dims = {f.name[len(pre) :]: f.dim for f in group.factors if f.name.startswith(pre)}
    # GL(4) per head for query-key and value-output, the key bias and the value bias; the
    # heads do not permute (ALiBi's slopes differ between them)
    assert dims == {"qk": 32, "vo": 32, "key_shift": 8, "value_shift": 8}
    perms = [f for f in group.factors if isinstance(f, (HeadPermFactor, PermutationFactor))]
    assert not [f for f in perms if pre + "query_key_value.weight" in f.params()]


def test_bloom_from_embeddings_is_complete() -> None:
    """Fed embeddings (`inputs_embeds`), one-layer BLOOM's redundancy is all symmetry: the
    discovered dimension equals `n − rank J` (the unread token table included)."""
    model = _bloom()
    inputs = {"inputs_embeds": batch(24, T, 8)}  # more outputs than parameters
    group = gaugenet.symmetries(model, inputs)
    _bloom_attention_factors(group)
    ref, gen = _out_kw(model, inputs), torch.Generator().manual_seed(4)
    assert relative_error(_out_kw(group.act(model, group.sample(gen)), inputs), ref) < 1e-12
    assert group.dim == _kernel_dim(model, inputs)[0] == 403


def _out_kw(model: nn.Module, inputs: dict) -> torch.Tensor:
    # BLOOM's softmax computes in float32 unless kept in float64
    with torch.no_grad(), keep_float64():
        return model(**inputs).last_hidden_state


def _table_norm_directions(model: nn.Module, fm: FlatModel) -> torch.Tensor:
    """`(n_params, 16)`: moving the gain `γ` or the bias `β` of the LayerNorm after the
    token table along one coordinate, each table row `e_r` moved so that the norm's output
    `y_r = γ ⊙ x̂(e_r) + β` changes only along `1`, which every reader of `y_r` removes
    (LayerNorms, per token). With `eps > 0` the normalized row `x̂(e) = (e − ē)/√(var e + eps)`
    fills an open ball of the centered plane, so this is always solvable to first order:
    `γ ⊙ (∂x̂/∂e) δe_r − λ_r 1 = −(δγ ⊙ x̂_r + δβ)`."""
    ln = model.word_embeddings_layernorm
    rows, gamma = model.word_embeddings.weight.detach(), ln.weight.detach()

    def unit(e: torch.Tensor) -> torch.Tensor:
        c = e - e.mean()
        return c / torch.sqrt((c * c).mean() + ln.eps)

    off, d = fm.offsets(), gamma.numel()
    out = torch.zeros(fm.theta.numel(), 2 * d, dtype=F64)
    eye = torch.eye(d, dtype=F64)
    for r, e in enumerate(rows):
        # unknowns `(δe_r, λ_r)` per direction, `δe_r ⊥ 1` (the centering is in the group);
        # regular since `1` is off the plane that `γ ⊙ x̂` spans
        a = torch.zeros(d + 1, d + 1, dtype=F64)
        a[:d, :d] = gamma[:, None] * torch.func.jacrev(unit)(e)
        a[:d, d], a[d, :d] = -1.0, 1.0
        rhs = -torch.cat([unit(e)[:, None] * eye, eye], 1)  # (d, 2d): δγ_j, then δβ_j
        sol = torch.linalg.solve(a, torch.cat([rhs, torch.zeros(1, 2 * d, dtype=F64)]))
        start = off["word_embeddings.weight"] + r * d
        out[start : start + d] = sol[:d]
    g0, b0 = off["word_embeddings_layernorm.weight"], off["word_embeddings_layernorm.bias"]
    out[g0 : g0 + d, :d] = eye
    out[b0 : b0 + d, d:] = eye
    return out


def test_bloom_on_tokens_misses_only_the_table_norm() -> None:
    """On token ids, the attention is complete, and the redundancy the group misses
    (`n − rank J − dim = 15`) is exactly that of the LayerNorm after the token table: its
    gain and bias (16 entries, one direction of which, `β` along `1`, is in the group) can
    be traded for the table's rows (`_table_norm_directions`), a change of the rows that is
    not linear in them, which discovery does not offer."""
    model = _bloom()
    inputs = {"input_ids": token_ids(V, 40, T)}  # as the coverage row
    group = gaugenet.symmetries(model, inputs)
    _bloom_attention_factors(group)
    missing, jac, fm = _kernel_dim(model, inputs)
    assert (group.dim, missing) == (235, 250)
    dirs = _table_norm_directions(model, fm)
    # in `ker J` (to first order, exact): relative residual at rounding level
    assert (jac @ dirs).norm() / (torch.linalg.matrix_norm(jac, 2) * dirs.norm()) < 1e-12
    orbit = orbit_projector(model, group)
    off_orbit = orbit(dirs)
    assert torch.linalg.matrix_rank(off_orbit, rtol=1e-8) == 15  # one of 16 in the group
    # and together with the orbit they span all of `ker J`
    kernel = torch.linalg.svd(jac, full_matrices=True).Vh[jac.shape[1] - missing :].T
    basis = span(off_orbit, 1e-8 * float(off_orbit.norm()))
    rest = orbit(kernel) - basis @ (basis.T @ orbit(kernel))
    # (without them the rest would be the 15 missing unit directions, norm √15)
    assert float(rest.norm()) < 1e-8
