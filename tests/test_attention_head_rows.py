"""Heads on listed projection rows: a fused query-value-key projection split into model-parallel
partitions (as CodeGen's), so that each head reads rows spread over several partitions, not
one block. The attention factors, the key shift, the LayerNorm kernel linked to them and the
head permutations act on exactly those rows; certified complete against the Jacobian."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.groups import MatTerm

E, H, DH, MP = 8, 2, 4, 4  # hidden, heads, head size, partitions
LOCAL = E // MP  # each partition holds 2 query, 2 value and 2 key rows: half a head
W_QKV = "qkv.weight"


class PartitionedAttention(nn.Module):
    """LayerNorm, then a fused projection whose output is `MP` partitions of `[q | v | k]`
    (`LOCAL` rows each); the heads are cut from the partitions' queries (values, keys) put
    back to back, so head `h` reads rows of two partitions."""

    def __init__(self, out_bias: bool = False) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(E)
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E, bias=out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(self.ln(x)).view(b, t, MP, 3 * LOCAL)
        q, v, k = qkv.split(LOCAL, dim=-1)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, t, H, DH).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.out(o.transpose(1, 2).reshape(b, t, E))


def _rows(part: int) -> torch.Tensor:
    """`(H, DH)`: the projection rows of each head's queries (`part = 0`), values (1) or
    keys (2): entry `i` of the part's heads lies in partition `i // LOCAL`."""
    i = torch.arange(E)
    return ((i // LOCAL) * 3 * LOCAL + part * LOCAL + i % LOCAL).reshape(H, DH)


def _setup(out_bias: bool = False):
    torch.manual_seed(0)
    model = PartitionedAttention(out_bias).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm and biases away from their initial values
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(16, 5, E, generator=gen, dtype=torch.float64)
    return model, x, gaugenet.symmetries(model, x)


@pytest.fixture(scope="module")
def setup():
    return _setup()


def _factor(group, suffix: str):
    (f,) = [f for f in group.factors if f.name.endswith(suffix)]
    return f


def test_heads_read_the_partitions_rows(setup) -> None:
    _, _, group = setup
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    qk, vo = _factor(group, ".qk"), _factor(group, ".vo")
    (tq,) = [t for t in qk.terms if t.param == W_QKV and t.mode == "T"]
    (tk,) = [t for t in qk.terms if t.param == W_QKV and t.mode == "inv"]
    (tv,) = [t for t in vo.terms if t.param == W_QKV]
    assert torch.equal(tq.index(H, DH), _rows(0))
    assert torch.equal(tv.index(H, DH), _rows(1))
    assert torch.equal(tk.index(H, DH), _rows(2))
    # head 0's queries: rows 0, 1 of partition 0 and rows 0, 1 of partition 1
    assert _rows(0)[0].tolist() == [0, 1, 6, 7]
    shift = _factor(group, ".key_shift")
    assert torch.equal(shift.terms[0].rows, _rows(2).reshape(-1))


def test_complete_against_the_jacobian(setup) -> None:
    """LayerNorm: its scale (8), its shift taken back by the biases (8) and its kernel in the
    24 projection rows; query-key `GL(4)` per head (32), value-output `GL(4)` per head
    (32), the key-bias shift (8). The value bias has no output bias to take it back."""
    model, x, group = setup
    dims = {f.name: f.dim for f in group.factors}
    assert dims["ln_kernel:ln"] == 24
    report = gaugenet.certify(model, x, group=group, method="exact")
    assert report.unexplained == 0 and report.exact, report
    assert report.symmetry_dim == report.n_params - report.functional_dimension
    assert report.symmetry_dim == 8 + 8 + 24 + 32 + 32 + 8 == 112
    assert not report.wrong


def test_random_element_keeps_the_function(setup) -> None:
    model, x, group = setup
    for seed in range(3):
        g = group.sample(torch.Generator().manual_seed(seed))
        with keep_float64():
            assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-9


def test_group_law(setup) -> None:
    """`act(act(m, g), h) == act(m, compose(g, h))` and `g⁻¹` undoes `g`: the kernel's
    entries move with the element blocks on the listed rows (`moved_by` by position)."""
    model, _, group = setup
    gen = torch.Generator().manual_seed(5)
    g, h = group.sample(gen, scale=0.4), group.sample(gen, scale=0.4)
    with keep_float64():
        twice = group.act(group.act(model, g), h)
        once = group.act(model, group.compose(g, h))
        back = group.act(group.act(model, g), group.inverse(g))
    with torch.no_grad():
        for (name, p), q in zip(twice.named_parameters(), once.parameters()):
            assert float((p - q).abs().max()) < 1e-10 * (1 + float(p.abs().max())), name
        for p, q in zip(model.parameters(), back.parameters()):
            assert float((p - q).abs().max()) < 1e-10 * (1 + float(p.abs().max()))


def test_contiguous_rows_are_not_a_symmetry(setup) -> None:
    """Negative: the same query-key element on contiguous blocks of rows (where the heads
    would be without the partitions) changes the outputs; on the listed rows it does not."""
    model, x, group = setup
    qk = _factor(group, ".qk")
    g = qk.sample(torch.Generator().manual_seed(2))
    right = list(qk.terms)  # weight and bias rows of the queries and keys
    # queries on rows 0 ... 8, keys on rows 8 ... 16: a `[q | k | v]` layout
    wrong = [MatTerm(t.param, t.axis, 0 if t.mode == "T" else E, t.mode) for t in right]
    for terms, small in ((right, True), (wrong, False)):
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        for t in terms:
            t(state, g)
        moved = copy.deepcopy(model)
        moved.load_state_dict(state, strict=False)
        err = gaugenet.invariance_error(model, moved, x)
        assert (err < 1e-9) if small else (err > 1e-3), err


def test_group_law_needs_the_kernel_moves(setup) -> None:
    """Negative: declared without the moves of its entries by the element blocks on the
    listed rows, the kernel composes wrongly with the attention factors."""
    model, _, group = setup
    gen = torch.Generator().manual_seed(5)
    g, h = group.sample(gen, scale=0.4), group.sample(gen, scale=0.4)
    kern = _factor(group, "ln_kernel:ln")
    assert any(isinstance(m[2], torch.Tensor) for m in kern.moved_by)
    plain = gaugenet.GaugeGroup(
        tuple(dataclasses.replace(f, moved_by=()) if f is kern else f for f in group.factors),
        group.breakers,
        group.param_names,
    )
    with keep_float64():
        twice = group.act(group.act(model, g), h)
        wrong = plain.act(model, plain.compose(g, h))
    with torch.no_grad():
        gap = (wrong.get_parameter(W_QKV) - twice.get_parameter(W_QKV)).abs().max()
    assert float(gap) > 1e-3


def test_head_permutation_moves_the_listed_rows(setup) -> None:
    """Swapping the two heads moves each head's spread rows (and the output columns) and keeps
    the function; swapping contiguous halves of the projection instead does not."""
    model, x, group = setup
    perm = _factor(group, ".kv_groups")
    swap = {perm.name: torch.tensor([1, 0])}
    with keep_float64():
        assert gaugenet.invariance_error(model, group.act(model, swap), x) < 1e-10
    rows = [t.entries for t in perm.terms if t.param == W_QKV]  # queries, keys, values
    assert [r.tolist() for r in rows] == [_rows(p).tolist() for p in (0, 2, 1)]
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        w = wrong.get_parameter(W_QKV)
        w.copy_(torch.cat([w[12:], w[:12]]))
        o = wrong.get_parameter("out.weight")
        o.copy_(torch.cat([o[:, 4:], o[:, :4]], 1))
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3


class GroupedPacked(nn.Module):
    """Grouped-query attention with each key-value group's rows packed together,
    `[q_0 | q_1 | k | v]` per group: the query heads are spread (rows 0, 1 / 2, 3 / 8, 9 /
    10, 11), the keys and values evenly strided."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(E, 2 * 4 * 2)  # 2 groups of 2 query heads, head size 2
        self.out = nn.Linear(8, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        z = self.qkv(x).view(b, t, 2, 4, 2)
        q = z[:, :, :, :2].reshape(b, t, 4, 2).transpose(1, 2)
        k = z[:, :, :, 2].transpose(1, 2).repeat_interleave(2, 1)
        v = z[:, :, :, 3].transpose(1, 2).repeat_interleave(2, 1)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, t, -1))


def test_grouped_heads_packed_per_group() -> None:
    """Query-key `GL(2)` per group (8), value-output (8), value shift (4), key shift (4):
    complete; the group and head permutations move the packed rows."""
    torch.manual_seed(0)
    model = GroupedPacked().double()
    x = torch.randn(32, 5, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    perm = _factor(group, ".kv_groups")
    assert perm.terms[0].entries.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert _factor(group, ".heads[1]").terms[0].entries.tolist() == [[8, 9], [10, 11]]
    for seed in range(3):
        g = group.sample(torch.Generator().manual_seed(seed))
        with keep_float64():
            assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-10
    report = gaugenet.certify(model, x, group=group, method="exact")
    assert report.unexplained == 0 and report.exact, report
    assert report.symmetry_dim == report.n_params - report.functional_dimension == 24
    # negative: swapping query heads of different groups (rows 2, 3 and 8, 9) is no symmetry
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        w, o = wrong.qkv.weight, wrong.out.weight
        w[[2, 3, 8, 9]], o[:, [2, 3, 4, 5]] = w[[8, 9, 2, 3]].clone(), o[:, [4, 5, 2, 3]].clone()
        wrong.qkv.bias[[2, 3, 8, 9]] = wrong.qkv.bias[[8, 9, 2, 3]].clone()
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3


def test_value_shift_on_the_listed_rows() -> None:
    """With an output bias, the value-bias shift (8) moves the spread value rows and the
    output bias takes it back: complete (120); negative: the same shift on the query rows."""
    model, x, group = _setup(out_bias=True)
    shift = _factor(group, ".value_shift")
    assert shift.dim == 8
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert torch.equal(shift.terms[0].entries(state, 8), state["qkv.bias"][_rows(1).reshape(-1)])
    u = torch.linspace(-1.0, 2.0, 8, dtype=torch.float64)
    with keep_float64():
        assert gaugenet.invariance_error(model, group.act(model, {shift.name: u}), x) < 1e-10
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.qkv.bias[_rows(0).reshape(-1)] += u
        wrong.out.bias -= wrong.out.weight @ u
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3
    report = gaugenet.certify(model, x, group=group, method="exact")
    assert report.unexplained == 0 and report.exact, report
    assert report.symmetry_dim == report.n_params - report.functional_dimension == 112 + 8
