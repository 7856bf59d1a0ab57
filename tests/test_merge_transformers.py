"""Aligning transformers: the residual stream's rotations, weight matching over the whole
gauge group (per-head attention `GL` included), and what is not a symmetry."""

from __future__ import annotations

import pytest
import torch

import gaugenet
from gaugenet.apply import align_to
from gaugenet.apply._match import match_stream, state_distance
from gaugenet.apply._residual import ResidualRotationFactor, residual_factors
from gaugenet.apply._vit import DigitsViT, vit_group
from gaugenet.groups import model_state


def _vit(seed: int) -> DigitsViT:
    torch.manual_seed(seed)
    m = DigitsViT(d=8, heads=2, ff=8, layers=2).double().eval()
    with torch.no_grad():  # O(1) weights: biases and positions as large as the rest
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64) / p.shape[-1] ** 0.5)
    return m


@pytest.fixture(scope="module")
def setup():
    a, b = _vit(0), _vit(1)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return a, b, x, vit_group(a, x[:2])


def _factor(group, name):
    return next(f for f in group.factors if f.name == name)


def test_residual_rotation_is_a_symmetry(setup, gen):
    a, _, x, group = setup
    rot = _factor(group, "rot:residual")
    assert isinstance(rot, ResidualRotationFactor) and rot.dim == 7 * 6 // 2
    q = rot.sample(gen, scale=1.0)
    rot.validate(q)
    moved = group.act(a, {rot.name: q})
    assert state_distance(model_state(a), model_state(moved)) > 1.0  # really moved
    assert gaugenet.invariance_error(a, moved, x) < 1e-12
    full = group.act(a, group.sample(gen))  # every factor at once, rotation included
    assert gaugenet.invariance_error(a, full, x) < 1e-10


def test_residual_non_symmetries_change_the_function(setup, gen):
    a, _, x, group = setup
    rot = _factor(group, "rot:residual")
    # an invertible map of the stream that is not orthogonal: LayerNorm does not commute
    g = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(8, 8, generator=gen)
    state = group.act_state(model_state(a), {rot.name: g[None]}, validate=False)
    moved = DigitsViT(d=8, heads=2, ff=8, layers=2).double().eval()
    moved.load_state_dict(state)
    assert gaugenet.invariance_error(a, moved, x) > 1e-2
    # orthogonal but moving the all-ones vector: the mean LayerNorm removes is not kept
    h, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    moved.load_state_dict(group.act_state(model_state(a), {rot.name: h[None]}, validate=False))
    assert gaugenet.invariance_error(a, moved, x) > 1e-2
    with pytest.raises(gaugenet.GaugeError, match="Q1"):
        rot.validate(h[None])
    with pytest.raises(gaugenet.GaugeError, match="orthogonal"):
        rot.validate(g[None])
    # and a random change of the weights (a constant added to a weight reading a
    # LayerNorm would not do: LayerNorm's output is orthogonal to 1, a gauge direction)
    with torch.no_grad():
        moved.load_state_dict(model_state(a))
        w = moved.blocks[0].attn.in_proj_weight
        w.add_(0.1 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
    assert gaugenet.invariance_error(a, moved, x) > 1e-3


def test_full_alignment_keeps_function_and_is_closer_than_permutations(setup):
    a, b, x, group = setup
    dist = {}
    for how in ("none", "permutation", "full"):
        aligned = align_to(a, b, x[:2], align=how, group=group)
        assert gaugenet.invariance_error(b, aligned, x) < 1e-10  # float64: a gauge move
        dist[how] = state_distance(model_state(a), model_state(aligned))
    assert dist["permutation"] <= dist["none"]
    assert dist["full"] < 0.9 * dist["permutation"]  # the continuous factors do much more


def test_full_alignment_recovers_a_rotated_permuted_copy(setup, gen):
    a, _, x, group = setup
    names = ("rot:residual", "perm:residual", "perm:blocks.0.fc1", "blocks.1.attn.heads")
    g = group.sample(gen)
    g = {k: v for k, v in g.items() if k in names}
    b = group.act(a, g)
    assert state_distance(model_state(a), model_state(b)) > 1.0
    aligned = align_to(a, b, x[:2], align="full", group=group)
    assert state_distance(model_state(a), model_state(aligned)) < 1e-8


def test_match_stream_recovers_permutation_and_rotation(setup, gen):
    *_, group = setup
    rot, perm = _factor(group, "rot:residual"), _factor(group, "perm:residual")
    h = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    p = torch.randperm(8, generator=gen)
    found = match_stream(perm, h, h[:, torch.argsort(p)])
    assert torch.equal(h[:, torch.argsort(p)][:, found], h)
    q = rot.sample(gen, scale=1.0)
    r = match_stream(rot, h, h @ q[0].T)
    assert torch.allclose(h @ q[0].T @ r[0], h, atol=1e-10)


def test_residual_factors_need_writers_and_readers():
    with pytest.raises(gaugenet.GaugeError, match="writer"):
        residual_factors("s", 4, [], [("w", 1)])
