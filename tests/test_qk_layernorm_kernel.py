"""A LayerNorm of each head's queries or keys removes a constant along `1` from the head's
projection rows, token by token: `W_h ↦ W_h + 1 aᵀ`, `b_h ↦ b_h + a₀ 1` changes nothing
(`discovery/_head_norm_kernel.py`, found by measuring the map from the projection to the
norm, `_head_norm_find.py`). With a `β` on the key norm, its entries on coordinates that
every score map treats alike (unrotated) are a softmax-invariant shift (`gain_key_shift`).

Float64 counts against `n − rank J` (Persimmon: fused projection, gain and bias, partial
rotary; Cohere with `use_qk_norm`: a per-head gain written out in float32), invariance of
random elements, group laws, and negatives: the same move on value rows (no norm), on the
rows of an RMSNorm, or on a rotated coordinate of `β_k` changes the outputs; without the new
factors the count falls short."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

import gaugenet
from gaugenet._invariance import relative_error
from gaugenet.attention._factors import KeyShiftFactor
from gaugenet.certify import Verdict
from gaugenet.certify._functional_dimension import rank_of
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.certify._keywords import positional
from gaugenet.certify._orbit import orbit_projector
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.discovery._head_norm_kernel import HeadNormKernelFactor
from gaugenet.discovery._head_norm_link import _linked
from gaugenet.discovery.rules._examples import batch, seeded
from gaugenet.groups import GaugeGroup, model_state
from tiny_hf import DECODER, tiny_hf

PERSIMMON = {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}


def _persimmon() -> tuple[nn.Module, dict]:
    return tiny_hf("PersimmonModel", "PersimmonConfig", **PERSIMMON)


def _cohere() -> tuple[nn.Module, dict]:
    """A parallel block: its MLP sees one input row per token, so 128 ids, each several
    times, keep its parameters from fitting the batch (as the coverage row)."""
    cfg = {**DECODER, "vocab_size": 128, "use_qk_norm": True}
    return tiny_hf("CohereModel", "CohereConfig", batch=96, **cfg)


def _out(model: nn.Module, x) -> Tensor:
    """The outputs in float64 throughout (the models' float32 casts kept in float64)."""
    with torch.no_grad(), keep_float64():
        return model(**x)[0] if isinstance(x, dict) else model(x)


def _nullity(model: nn.Module, x) -> int:
    """`n − rank J` on `x` (float64 throughout, `rtol = 1e-9`)."""
    flat_m, flat_in = positional(model, x)
    with keep_float64():
        jac = jacobian_of(flat_model(flat_m, flat_in))
    n = sum(p.numel() for p in model.parameters())
    return n - rank_of(jac, rtol=1e-9).rank


def _kernels(group: GaugeGroup) -> list[HeadNormKernelFactor]:
    return [f for f in group.factors if isinstance(f, HeadNormKernelFactor)]


@pytest.mark.parametrize(
    "build,kernel,shift",
    [
        # 2 heads × (q, k) × (8 columns + 1 bias − the input LayerNorm's own 1/γ')
        (_persimmon, 32, 2),
        # 2 heads × (q, k) × (8 columns − 1/γ'), no bias; the key norm has no β
        (_cohere, 28, 0),
    ],
)
def test_normalized_heads_are_complete(build, kernel: int, shift: int) -> None:
    model, x = build()
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    assert sum(f.dim for f in _kernels(group)) == kernel
    assert sum(f.dim for f in group.factors if isinstance(f, KeyShiftFactor)) == shift
    assert group.dim == _nullity(model, x)
    with keep_float64():
        report = gaugenet.certify(model, x, group=group)
    assert report.verdict is Verdict.COMPLETE and report.unexplained == 0
    ref, gen = _out(model, x), torch.Generator().manual_seed(2)
    for _ in range(3):
        assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-12


def test_without_the_new_factors_the_count_falls_short() -> None:
    """Negative: the orbit without the kernels and the key shift misses exactly their
    dimensions (no other factor holds them)."""
    model, x = _persimmon()
    group = gaugenet.symmetries(model, x)
    new = [f for f in group.factors if isinstance(f, (HeadNormKernelFactor, KeyShiftFactor))]
    rest = GaugeGroup(tuple(f for f in group.factors if f not in new), (), group.param_names)
    assert orbit_projector(model, group).rank == group.dim == _nullity(model, x)
    assert orbit_projector(model, rest).rank == group.dim - 34


def test_group_laws_with_the_rest_of_the_group() -> None:
    """`act(act(m, g), h) == act(m, compose(g, h))` and `g⁻¹` undoes `g` (the kernels
    commute with the input LayerNorm's rescalings, shift and kernel)."""
    model, x = _persimmon()
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


def _moved_rows(model: nn.Module, f: HeadNormKernelFactor, rows: Tensor) -> nn.Module:
    """`model` with `f`'s move applied to `rows` instead of its own blocks."""
    term = dataclasses.replace(f.kernel, rows=rows)
    moved = dataclasses.replace(f, terms=(term,))
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    new = moved.apply(state, moved.sample(torch.Generator().manual_seed(5)))
    out = type(model)(model.config).double().eval()
    out.load_state_dict({**model.state_dict(), **new})
    return out


def test_the_same_move_on_value_rows_changes_the_outputs() -> None:
    """Negative: Persimmon's fused rows are `[q, k, v]` per head; the query kernel moved
    onto each head's value rows (read by no norm) changes the outputs, on the query rows
    it does not."""
    model, x = _persimmon()
    group = gaugenet.symmetries(model, x)
    q = next(f for f in _kernels(group) if f.name.endswith("q_norm_kernel"))
    ref = _out(model, x)
    assert relative_error(_out(_moved_rows(model, q, q.kernel.rows), x), ref) < 1e-12
    assert relative_error(_out(_moved_rows(model, q, q.kernel.rows + 8), x), ref) > 1e-3


def test_rms_norm_heads_have_no_kernel() -> None:
    """Negative: Qwen3's per-head RMSNorm removes no constant: no kernel is measured, and
    the count is still `n − rank J`."""
    model, x = tiny_hf("Qwen3Model", "Qwen3Config", **{**DECODER, "head_dim": 4})
    group = gaugenet.symmetries(model, x)
    assert _kernels(group) == []
    assert group.dim == _nullity(model, x)


def test_a_rotated_key_bias_coordinate_is_not_free() -> None:
    """Negative: the key norm's `β` shifted on an unrotated coordinate (3) keeps the
    outputs; on a rotated one (0) it changes them."""
    model, x = _persimmon()
    ref = _out(model, x)
    beta = model.layers[0].self_attn.k_layernorm.bias
    for j, free in ((3, True), (0, False)):
        with torch.no_grad():
            beta[j] += 0.5
        err = relative_error(_out(model, x), ref)
        with torch.no_grad():
            beta[j] -= 0.5
        assert (err < 1e-12) if free else (err > 1e-3)


class PerHeadNorms(nn.Module):
    """A LayerNorm then attention over 8 features, 2 heads of 4, whose queries and keys are
    normalized by one `nn.LayerNorm(4)` per head, joined again (as StableLM's): the
    query-key part is not traced (two gains feed one input), the kernels are found all the
    same."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.qn = nn.ModuleList(nn.LayerNorm(4) for _ in range(2))
        self.kn = nn.ModuleList(nn.LayerNorm(4) for _ in range(2))

    def _heads(self, y: Tensor, norms: nn.ModuleList | None = None) -> Tensor:
        B, T, _ = y.shape
        y = y.view(B, T, 2, 4).transpose(1, 2)
        if norms is None:
            return y
        return torch.cat([n(h) for n, h in zip(norms, torch.split(y, 1, dim=1))], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        q, k = self._heads(self.q(h), self.qn), self._heads(self.k(h), self.kn)
        a = torch.softmax(q @ k.transpose(-2, -1) / 2, dim=-1) @ self._heads(self.v(h))
        return self.o(a.transpose(1, 2).reshape(x.shape))


def test_kernels_of_norms_joined_per_head() -> None:
    model, x = seeded(PerHeadNorms).double(), batch(32, 6, 8).double()
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    kernels = _kernels(group)
    # one factor per norm: 8 columns + 1 bias − the input LayerNorm's own direction
    assert sorted(f.dim for f in kernels) == [8] * 4
    report = gaugenet.certify(model, x, group=group)
    assert report.worst_residual < 1e-10
    ref, gen = _out(model, x), torch.Generator().manual_seed(6)
    assert relative_error(_out(group.act(model, group.sample(gen)), x), ref) < 1e-12


def _stablelm() -> tuple[nn.Module, dict]:
    cfg = {**DECODER, "partial_rotary_factor": 0.5, "qk_layernorm": True}
    return tiny_hf("StableLmForCausalLM", "StableLmConfig", **cfg)


def test_stablelm_kernels_commute_with_the_offset_and_turn_with_the_stream() -> None:
    """StableLM with `qk_layernorm`: bias-free projections read a LayerNorm with `β`, whose
    offset group turns them and whose stream the embedding rotation turns; the kernels are
    written to commute with the offset and declare the rotation. Of `n − rank J`, 6 are
    left: the query-key gain scales of its per-head norms, joined by `torch.cat` (two gains
    feed one core input: not traced); the value rows' shift along `1` is held
    (`test_value_row_shift.py`)."""
    model, x = _stablelm()
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    kernels = _kernels(group)
    assert sum(f.dim for f in kernels) == 32
    assert all(f.kernel.offset and f.moved_by for f in kernels)
    assert any(f.kind == "offset" for f in group.factors)  # the offset is kept as well
    assert group.dim == _nullity(model, x) - 6
    ref, gen = _out(model, x), torch.Generator().manual_seed(7)
    g, h = group.sample(gen), group.sample(gen)
    assert relative_error(_out(group.act(model, g), x), ref) < 1e-12
    twice = model_state(group.act(group.act(model, g), h))
    once = model_state(group.act(model, group.compose(g, h)))
    for k in twice:
        assert torch.allclose(twice[k], once[k], rtol=1e-10, atol=1e-10)


def test_plain_coordinates_do_not_commute_with_the_offset() -> None:
    """Negative: the same kernels written as `W̃_h += u aᵀ` (without the offset's
    coordinates) fail the commutation check against the offset, and are left out."""
    model, x = _stablelm()
    group = gaugenet.symmetries(model, x)
    state = {k: v.double() for k, v in model_state(model).items()}
    factors = list(group.factors)
    for f in _kernels(group):
        assert _linked(f, factors, state) is not None
        plain = dataclasses.replace(f.kernel, offset=False)
        mutated = dataclasses.replace(f, terms=(plain,), moved_by=())
        assert _linked(mutated, factors, state) is None
