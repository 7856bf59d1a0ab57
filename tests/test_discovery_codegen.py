"""CodeGen (a parallel block; its fused projection split into 4 model-parallel partitions of
`[q | v | k]`, so that a head of size 4 reads rows of two partitions; partial rotary,
rotating every two coordinates; no biases on the attention). Discovery finds the attention
factors on the listed head rows and keeps the LayerNorm kernel and offset linked to them, and
the value-bias shift of the bias-free value rows written in the LayerNorm's coordinates, taken
back by the MLP's output bias (`discovery/_value_row_shift.py`): the row is complete."""

from __future__ import annotations

import pytest
import torch

import gaugenet
from gaugenet.certify._functional_dimension import rank_of
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.certify._keywords import positional
from gaugenet.certify._orbit import orbit_projector
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.discovery._value_row_shift import ValueRowShiftFactor
from tiny_hf import unit_gain

V, T, E = 128, 6, 8
QKV = "h.0.attn.qkv_proj.weight"
#: value entry `i` (head `i // 4`, coordinate `i % 4`) is row `6 (i // 2) + 2 + i % 2`:
#: partition `i // 2` holds queries, values, keys, two rows each
VALUE_ROWS = torch.tensor([2, 3, 8, 9, 14, 15, 20, 21])


def _codegen() -> tuple[torch.nn.Module, dict]:
    import transformers

    cfg = transformers.CodeGenConfig(
        vocab_size=V,
        n_embd=E,
        n_layer=1,
        n_head=2,
        rotary_dim=2,
        n_positions=T,
        n_ctx=T,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.CodeGenModel(cfg).double().eval()
    gen = torch.Generator().manual_seed(0)
    unit_gain(model, gen, bias=0.1)
    ids = torch.randint(0, V, (96 * T,), generator=gen)
    ids[:V] = torch.arange(V)  # every token, several times
    return model, {"input_ids": ids[torch.randperm(ids.numel(), generator=gen)].reshape(96, T)}


@pytest.fixture(scope="module")
def codegen():
    model, ids = _codegen()
    return model, ids, gaugenet.symmetries(model, ids)


def test_attention_on_the_partitions_rows(codegen) -> None:
    model, ids, group = codegen
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    dims = {f.name: f.dim for f in group.factors}
    # rotary on 2 of 4 coordinates: a scaled rotation (2) and GL(2) (4) per head
    assert dims["h.0.attn.qk"] == 12 and dims["h.0.attn.vo"] == 32
    # the LayerNorm kernel: 32 MLP rows and the 2 unrotated key rows of each head
    assert dims["ln_kernel:h.0.ln_1"] == 36
    (vo,) = [f for f in group.factors if f.name == "h.0.attn.vo"]
    (tv,) = [t for t in vo.terms if t.param == QKV]
    assert torch.equal(tv.index(2, 4).reshape(-1), VALUE_ROWS)
    g = group.sample(torch.Generator().manual_seed(1))
    with keep_float64():
        assert gaugenet.invariance_error(model, group.act(model, g), ids) < 1e-9


def _value_kernel(model, names, sizes) -> torch.Tensor:
    """`(n, 8)`: per value entry `i`, `W_qkv[row_i] += 1/γ` with `b_fc_out −= (Σ β/γ) W_o[:, i]`
    (the constant the value takes on, after the attention and `out_proj`, is summed with the
    MLP's output, whose bias takes it back)."""
    ln = model.h[0].ln_1
    u = 1 / ln.weight.detach()
    c = float((ln.bias.detach() * u).sum())
    w_o = model.h[0].attn.out_proj.weight.detach()
    starts = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    out = torch.zeros(sum(sizes), 8, dtype=torch.float64)
    for i, r in enumerate(VALUE_ROWS.tolist()):
        out[starts[QKV] + r * E + torch.arange(E), i] = u
        b = starts["h.0.mlp.fc_out.bias"]
        out[b : b + E, i] = -c * w_o[:, i]
    return out


def test_the_value_rows_kernel_is_in_the_orbit(codegen) -> None:
    """`n − rank J` equals the group's dimension; the LayerNorm kernel on the value rows (no
    value bias; the compensation goes through `out_proj` into the MLP's output bias), built
    here by hand, is in `ker J` and in the orbit (the value-row shift on the listed rows).
    The same directions on the query rows are not in `ker J` (negative)."""
    model, ids, group = codegen
    fm_model, fm_in = positional(model, ids)
    with keep_float64():
        fm = flat_model(fm_model, fm_in)
        jac = jacobian_of(fm)
    n = sum(fm.sizes)
    rank = rank_of(jac, rtol=1e-9).rank
    assert group.dim == n - rank == 273
    (shift,) = [f for f in group.factors if isinstance(f, ValueRowShiftFactor)]
    assert shift.shift.rows == tuple(VALUE_ROWS.tolist())
    extra = _value_kernel(model, fm.names, fm.sizes)
    scale = float(jac.abs().max())
    assert float((jac @ extra).abs().max()) < 1e-10 * scale * float(extra.abs().max())
    orbit = orbit_projector(model, group).basis()
    both = torch.cat([orbit, extra / extra.norm(dim=0)], 1)
    assert int(torch.linalg.matrix_rank(orbit, rtol=1e-8)) == n - rank
    assert int(torch.linalg.matrix_rank(both, rtol=1e-8)) == n - rank
    # negative: the query rows of the same partitions carry no such direction
    wrong = extra.clone()
    start = dict(zip(fm.names, torch.tensor([0, *fm.sizes]).cumsum(0).tolist()))[QKV]
    for i, r in enumerate(VALUE_ROWS.tolist()):
        wrong[start + r * E : start + (r + 1) * E, i] = 0
        wrong[start + (r - 2) * E : start + (r - 1) * E, i] = extra[
            start + r * E : start + (r + 1) * E, i
        ]
    assert float((jac @ wrong).abs().max()) > 1e-6 * scale
