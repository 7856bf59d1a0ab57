"""A stream that starts at a linear map's output, with no embedding table (`Linear → norm →
Linear`), rotates as one that starts at a lookup: `O(d)` through an RMS normalization,
`O(d − 1)` through a LayerNorm. A split output rotates the block that reaches the norm
(DeepSeek's compressed keys and values)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.groups import OrthogonalFactor

F64 = torch.float64


class _Norm(nn.Module):
    """`a → norm → b`; with `also_out`, `a`'s output is returned too (its basis is seen)."""

    def __init__(self, norm: str, also_out: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.n = nn.LayerNorm(6) if norm == "layer" else nn.RMSNorm(6, eps=1e-6)
        self.b = nn.Linear(6, 3)
        self.also_out = also_out

    def forward(self, x: torch.Tensor):
        h = self.a(x)
        y = self.b(self.n(h))
        return (y, h) if self.also_out else y


class _Split(nn.Module):
    """`a`'s output split in two: `[:4]` through an RMSNorm into `b`, `[4:]` through `tanh`
    into `c`."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.n = nn.RMSNorm(4, eps=1e-6)
        self.b = nn.Linear(4, 3)
        self.c = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = torch.split(self.a(x), [4, 2], dim=-1)
        return self.b(self.n(u)) + self.c(torch.tanh(v))


def _perturbed(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = model.to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _inputs() -> torch.Tensor:
    return torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=F64)


def _rotation(group: gaugenet.GaugeGroup) -> OrthogonalFactor:
    (rot,) = [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    return rot


@pytest.mark.parametrize(("norm", "dim", "ones"), [("layer", 10, True), ("rms", 15, False)])
def test_stream_from_a_linear_map_rotates_and_is_complete(norm, dim, ones) -> None:
    model, x = _perturbed(_Norm(norm)), _inputs()
    group = gaugenet.symmetries(model, x)
    rot = _rotation(group)
    assert rot.dim == dim and rot.fixes_ones is ones and rot.table == "a.weight"
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete", report
    assert report.worst_residual < 1e-12
    # without the rotation, exactly its dimension of ker J is unexplained
    rest = tuple(f for f in group.factors if f is not rot)
    without = gaugenet.GaugeGroup(rest, group.breakers, group.param_names)
    assert gaugenet.certify(model, x, group=without).unexplained == dim
    g = group.sample(torch.Generator().manual_seed(2))
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    assert (moved.a.weight - model.a.weight).abs().max() > 1e-2


def test_a_rotation_moving_ones_through_a_layernorm_changes_the_outputs() -> None:
    model, x = _perturbed(_Norm("layer")), _inputs()
    rot = _rotation(gaugenet.symmetries(model, x))
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    new = {k: v.clone() for k, v in model.state_dict().items()}
    for t in rot.terms:
        t(new, q)
    wrong = _Norm("layer").to(F64)
    wrong.load_state_dict(new)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-2


def test_no_rotation_when_the_stream_is_an_output() -> None:
    """`a`'s output returned beside the network's: a rotation would change it."""
    model, x = _perturbed(_Norm("rms", also_out=True)), _inputs()
    group = gaugenet.symmetries(model, x)
    assert not [f for f in group.factors if isinstance(f, OrthogonalFactor)]
    # and the rotation found without that output does change it
    plain = _Norm("rms")
    plain.load_state_dict(model.state_dict())
    rot = _rotation(gaugenet.symmetries(plain.to(F64), x))
    new = {k: v.clone() for k, v in model.state_dict().items()}
    for t in rot.terms:
        t(new, rot.sample(torch.Generator().manual_seed(4)))
    moved = _Norm("rms", also_out=True).to(F64)
    moved.load_state_dict(new)
    with torch.no_grad():
        y0, h0 = model(x)
        y1, h1 = moved(x)
    assert (y1 - y0).abs().max() < 1e-12 and (h1 - h0).abs().max() > 1e-2


def test_a_split_output_rotates_the_block_that_reaches_the_norm() -> None:
    model, x = _perturbed(_Split()), _inputs()
    group = gaugenet.symmetries(model, x)
    rot = _rotation(group)
    assert rot.dim == 4 * 3 // 2 and not rot.fixes_ones and rot.table_block == (0, 4)
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete", report
    g = group.sample(torch.Generator().manual_seed(5))
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    assert torch.equal(moved.a.weight[4:], model.a.weight[4:])  # the tanh part is kept
    assert (moved.a.weight[:4] - model.a.weight[:4]).abs().max() > 1e-2
    # the same rotation on all six outputs (the block and the other part) changes them
    q = torch.eye(6, dtype=F64)
    q[:4, :4] = g[rot.name]
    q[4:, 4:] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    wrong = _Split().to(F64)
    wrong.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong.a.weight.copy_(q.T @ model.a.weight)
        wrong.a.bias.copy_(q.T @ model.a.bias)
        wrong.b.weight.copy_(moved.b.weight)
        wrong.n.weight.copy_(moved.n.weight)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-2


@pytest.mark.parametrize("build", [lambda: _Norm("layer"), _Split], ids=["layer", "split"])
def test_the_canonical_rotation_is_the_same_along_the_orbit(build) -> None:
    model, x = _perturbed(build()), _inputs()
    rot = _rotation(gaugenet.symmetries(model, x))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    other = dict(state)
    for t in rot.terms:
        t(other, rot.sample(torch.Generator().manual_seed(6)))
    forms = []
    for s in (state, other):
        s = dict(s)
        for t in rot.terms:
            t(s, rot.canonical_element(s))
        forms.append(s["a.weight"])
    assert (forms[0] - forms[1]).abs().max() < 1e-10
    assert (other["a.weight"] - state["a.weight"]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "build", [lambda: _Norm("layer"), lambda: _Norm("rms"), _Split], ids=["layer", "rms", "split"]
)
def test_canonicalize_gives_one_model_per_orbit(build) -> None:
    """The whole group's canonical form, from two points of the orbit: the same model."""
    model, x = _perturbed(build()), _inputs()
    group = gaugenet.symmetries(model, x)
    other = group.act(model, group.sample(torch.Generator().manual_seed(7)))
    a = gaugenet.canonicalize(model, example_inputs=x, group=group)
    b = gaugenet.canonicalize(other, example_inputs=x, group=group)
    assert gaugenet.invariance_error(model, a, x) < 1e-12
    assert max((p - q).abs().max() for p, q in zip(a.parameters(), b.parameters())) < 1e-12
    assert max((p - q).abs().max() for p, q in zip(model.parameters(), other.parameters())) > 1e-2


@pytest.mark.parametrize(("b", "c"), [(3, 2), (2, 3)])
def test_kernel_on_rows_a_stream_rotation_turns(b: int, c: int) -> None:
    """`LN(b) → Linear(b, c) → LN(c)`: the first LayerNorm's kernel `W += u (1/γ)ᵀ` sits on
    the rows that the stream rotation seeded at the second turns (`W ↦ Qᵀ W`), so `u ↦ Qᵀ u`
    is declared (`moved_by`): `g` then `g⁻¹` gives the parameters back (it moved them by
    about 1 when undeclared; found by `test_property_models`)."""
    from gaugenet.discovery._kernel import LayerNormKernelFactor

    model = nn.Sequential(
        nn.Linear(1, b, bias=False), nn.GELU(), nn.LayerNorm(b), nn.Linear(b, c),
        nn.LayerNorm(c), nn.Linear(c, 1, bias=False),
    ).to(F64)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(16, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    group = gaugenet.symmetries(model, x)
    assert not [r for r in group.breakers if "internal error" in r.reason]
    rot = _rotation(group)
    (kern,) = [f for f in group.factors if isinstance(f, LayerNormKernelFactor)]
    assert [m[0] for m in kern.moved_by] == [rot.name]
    g = group.sample(torch.Generator().manual_seed(1))
    back = group.act(group.act(model, g), group.inverse(g))
    for p, q in zip(model.parameters(), back.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-9
    # negative: without the declaration the inverse misses
    bare = gaugenet.GaugeGroup(
        tuple(dataclasses.replace(f, moved_by=()) if f is kern else f for f in group.factors),
        group.breakers,
        group.param_names,
    )
    back = bare.act(bare.act(model, g), bare.inverse(g))
    assert (
        max(float((p - q).abs().max()) for p, q in zip(model.parameters(), back.parameters()))
        > 1e-3
    )
