"""The mean-subtraction kernel of LayerNorm in its readers' rows (discovery/_kernel.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._kernel import LayerNormKernelFactor
from zoo import ZOO


def _entry(name: str):
    e = next(e for e in ZOO if e.name == name)
    return e.build(), e.inputs(torch.Generator().manual_seed(0))


def _kernels(group) -> dict[str, LayerNormKernelFactor]:
    return {f.name: f for f in group.factors if isinstance(f, LayerNormKernelFactor)}


def test_found_with_their_composition_rules() -> None:
    model, x = _entry("prenorm")
    k = _kernels(gaugenet.symmetries(model, x))
    assert {n: f.dim for n, f in k.items()} == {"ln_kernel:ln1": 12, "ln_kernel:ln2": 5}
    # query and key rows move with the query-key GL, value rows with the value-output GL
    assert k["ln_kernel:ln1"].moved_by == (
        ("attn.qk", "T", 0),
        ("attn.qk", "inv", 4),
        ("attn.vo", "T", 8),
    )
    assert [s[0] for s in k["ln_kernel:ln2"].scaled_by] == ["scale:fc1"]
    model, x = _entry("postnorm")  # ln1 feeds fc1 and the residual branch; ln2 nothing
    assert {n: f.dim for n, f in _kernels(gaugenet.symmetries(model, x)).items()} == {
        "ln_kernel:ln1": 5
    }


@pytest.mark.parametrize("name", ["prenorm", "postnorm"])
def test_large_kernel_shifts_keep_outputs(name: str, gen) -> None:
    model, x = _entry(name)
    group = gaugenet.symmetries(model, x)
    for f in _kernels(group).values():
        a = 3.0 * torch.randn(f.dim, generator=gen, dtype=torch.float64)
        assert gaugenet.invariance_error(model, group.act(model, {f.name: a}), x) < 1e-12


def test_negative_wrong_direction_or_no_compensation(gen) -> None:
    """Along a direction other than `1/γ`, or without the bias compensation, outputs move."""
    model, x = _entry("postnorm")
    gamma, beta = model.ln1.weight.detach(), model.ln1.bias.detach()
    a = torch.randn(5, generator=gen, dtype=torch.float64)

    def moved(direction: torch.Tensor, compensate: bool) -> float:
        other = gaugenet.symmetries(model, x).act(model, {})
        with torch.no_grad():
            other.fc1.weight.add_(a[:, None] * direction[None, :])
            if compensate:
                other.fc1.bias.sub_(a * (beta / gamma).sum())
        return gaugenet.invariance_error(model, other, x)

    assert moved(1 / gamma, True) < 1e-12
    assert moved(1 / gamma, False) > 1e-3
    assert moved(torch.ones(4, dtype=torch.float64), True) > 1e-3


@pytest.mark.parametrize("name", ["prenorm", "postnorm", "prenorm2", "postnorm2"])
def test_canonical_form_is_orbit_independent(name: str, gen) -> None:
    model, x = _entry(name)
    group = gaugenet.symmetries(model, x)
    ref = gaugenet.canonicalize(model, group=group)
    for f in _kernels(group).values():  # the gauge: reader rows orthogonal to γ
        ln = f.kernel.ln
        g = ref.get_submodule(ln).weight.detach()
        for s in f.kernel.slots:
            W = ref.get_parameter(s.weight).detach()[s.start : s.stop]
            assert float((W @ g).abs().max()) < 1e-12
    for _ in range(3):
        other = group.act(model, group.sample(gen))
        can = gaugenet.canonicalize(other, group=group)
        diff = max(float((p - q).abs().max()) for p, q in zip(ref.parameters(), can.parameters()))
        assert diff < 1e-9
        assert gaugenet.invariance_error(model, can, x) < 1e-12


def test_centered_outputs_and_residual_shift(gen) -> None:
    """Post-norm: out_proj and fc2 feed LayerNorms through residual sums (their outputs along
    `1` are free), and ln1's β moves into fc1's bias and, through the residual sum, into
    fc2's bias."""
    model, x = _entry("postnorm")
    group = gaugenet.symmetries(model, x)
    dims = {f.name: f.dim for f in group.of_kind("translation")}
    assert dims["center:attn.out_proj"] == 5 and dims["center:fc2"] == 6
    assert dims["shift:ln1"] == 4
    # the value shift's compensation is projected off 1, so it commutes with the centering
    vs = group.factor("attn.value_shift")
    assert all(t.center for t in vs.terms)
    for name in ("center:attn.out_proj", "center:fc2", "shift:ln1"):
        v = 2.0 * torch.randn(dims[name], generator=gen, dtype=torch.float64)
        assert gaugenet.invariance_error(model, group.act(model, {name: v}), x) < 1e-12
    # negative: along a direction other than 1 the output moves
    other = group.act(model, {})
    with torch.no_grad():
        other.fc2.bias.add_(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert gaugenet.invariance_error(model, other, x) > 1e-3
    # pre-norm: the residual stream after the attention also feeds the block output, so only
    # out_proj's bias along 1 is free, taken back by fc2's bias in the second residual sum
    model, x = _entry("prenorm")
    group = gaugenet.symmetries(model, x)
    names = [f.name for f in group.factors]
    assert not [n for n in names if n.startswith("center:")]
    f = group.factor("center_bias:attn.out_proj")
    assert f.dim == 1 and f.terms[0].compensate == ("fc2.bias",)
    assert gaugenet.invariance_error(model, group.act(model, {f.name: torch.ones(1)}), x) < 1e-12
    other = group.act(model, {})
    with torch.no_grad():  # negative: without fc2 taking it back the output moves
        other.attn.out_proj.bias.add_(1.0)
    assert gaugenet.invariance_error(model, other, x) > 1e-3


def test_feature_scales_after_prenorm_into_attention(gen) -> None:
    """Pre-norm: ln1's per-feature scale passes into in_proj's columns; its canonical gauge is
    pinned at |γ| = 1 (in_proj's norms change under the attention's GL factors)."""
    model, x = _entry("prenorm")
    group = gaugenet.symmetries(model, x)
    f = group.factor("scale:ln1:out")
    assert f.dim == 4 and "attn.in_proj_weight" in f.params()
    a = torch.exp(torch.randn(4, generator=gen, dtype=torch.float64))
    assert gaugenet.invariance_error(model, group.act(model, {f.name: a}), x) < 1e-12
    can = gaugenet.canonicalize(model, group=group)
    assert float((can.ln1.weight.detach().abs() - 1).abs().max()) < 1e-12
    # negative: scaling in_proj's columns the other way moves the output
    other = group.act(model, {})
    with torch.no_grad():
        other.attn.in_proj_weight.mul_(a[None, :])
        other.ln1.weight.mul_(a)
        other.ln1.bias.mul_(a)
    assert gaugenet.invariance_error(model, other, x) > 1e-3


def test_residual_streams_read_only_by_layernorms() -> None:
    """Two blocks, a final LayerNorm and a head: every path from the blocks' output layers
    ends in a LayerNorm, so their whole outputs along 1 are free (pre-norm: all four; post-
    norm: all four), and block 2's last LayerNorm in post-norm only feeds the final one (its
    β along 1). Negative: the single pre-norm block's stream reaches the output, so there
    only a compensated bias shift exists."""
    for name, expected in (
        ("prenorm2", {"b1.attn.out_proj", "b1.fc2", "b2.attn.out_proj", "b2.fc2"}),
        ("postnorm2", {"b1.attn.out_proj", "b1.fc2", "b2.attn.out_proj", "b2.fc2"}),
    ):
        model, x = _entry(name)
        names = [f.name for f in gaugenet.symmetries(model, x).factors]
        assert {n.split(":", 1)[1] for n in names if n.startswith("center:")} == expected
    model, x = _entry("postnorm2")
    assert "center_bias:b2.ln2" in [f.name for f in gaugenet.symmetries(model, x).factors]
    model, x = _entry("prenorm")
    assert not [f for f in gaugenet.symmetries(model, x).factors if f.name.startswith("center:")]


def test_kernel_skips_readers_without_bias() -> None:
    """A reader of a LayerNorm with a shift `β` but without a bias of its own cannot take
    back the constant `a Σ β/γ` a kernel row change adds: its rows are left out (they were
    offered before, and the self-check had to drop the whole kernel)."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(4)
            self.free, self.biased = nn.Linear(4, 3, bias=False), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(x)
            return torch.cat([self.free(h), self.biased(h)], -1)

    torch.manual_seed(0)
    model = Two().double()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.normal_()
    x = torch.randn(20, 4, dtype=torch.float64)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    kern = group.factor("ln_kernel:ln")
    assert kern.dim == 2 and "free.weight" not in kern.params()
    moved = group.act(model, group.sample(torch.Generator().manual_seed(1)))
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    # the same row change on the bias-free reader moves its outputs by a constant
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.free.weight += torch.ones(3, 1, dtype=torch.float64) / model.ln.weight
    assert gaugenet.invariance_error(model, bad, x) > 1e-2
