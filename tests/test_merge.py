"""Merging in a common gauge, and the loss barrier on the linear path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.apply import align_pair, align_to, interpolation_barrier, loss_curve, merge
from gaugenet.apply._models import digits, digits_mlp, train
from gaugenet.groups import model_state


def _mlp(gen: torch.Generator) -> nn.Sequential:
    m = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    m = m.double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return m


def _distance(a: nn.Module, b: nn.Module) -> float:
    sa, sb = model_state(a), model_state(b)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.fixture
def pair(gen):
    """A model and a randomly permuted and rescaled copy of it (same function)."""
    a = _mlp(gen)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    group = gaugenet.symmetries(a, x[:2])
    b = group.act(a, group.sample(gen, scale=0.7))
    return a, b, x, group


def test_permutation_alone_recovers_a_permuted_copy(pair, gen):
    a, _, x, group = pair
    g = group.sample(gen)
    b = group.act(a, {k: v for k, v in g.items() if k.startswith("perm:")})
    assert _distance(a, b) > 0.1  # negative: the copy is really moved
    assert _distance(a, align_to(a, b, x[:2], align="permutation", group=group)) == 0


def test_gauge_alignment_recovers_a_rescaled_permuted_copy(pair):
    a, b, x, group = pair
    assert _distance(a, align_to(a, b, x[:2], align="permutation", group=group)) > 0.1
    aligned = align_to(a, b, x[:2], group=group)
    assert _distance(a, aligned) < 1e-6
    assert gaugenet.invariance_error(b, aligned, x) < 1e-10  # a gauge move: same function


def test_barrier_vanishes_after_alignment(pair):
    a, b, x, group = pair
    y = a(x).argmax(-1)
    assert interpolation_barrier(a, b, (x, y)) > 0.1  # raw average of equivalent models fails
    a2, b2 = align_pair(a, b, x[:2], group=group)
    assert interpolation_barrier(a2, b2, (x, y)) < 1e-6
    ts, losses = loss_curve(a, b, (x, y), n_points=5)
    assert ts.shape == losses.shape == (5,)
    ce = nn.functional.cross_entropy
    assert losses[0] == pytest.approx(float(ce(a(x), y)))
    assert losses[-1] == pytest.approx(float(ce(b(x), y)))


def test_merge_of_equivalent_models_keeps_function(pair):
    a, b, x, group = pair
    merged = merge([a, b], x[:2], group=group)
    assert gaugenet.invariance_error(a, merged, x) < 1e-6
    plain = merge([a, b], x[:2], align="none", group=group)
    assert gaugenet.invariance_error(a, plain, x) > 0.05


def test_bad_alignment_raises(pair):
    a, b, x, _ = pair
    with pytest.raises(gaugenet.GaugeError, match="align"):
        align_to(a, b, x, align="sinkhorn")


def test_trained_digits_mlps_gauge_barrier_not_above_permutation():
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(train(digits_mlp(32), xtr, ytr, epochs=8, lr=3e-3, seed=seed))
    a, b = models
    data = (xte, yte)
    barriers = {}
    for how in ("none", "permutation", "permutation+gauge"):
        a2, b2 = align_pair(a, b, xte[:2], align=how)
        barriers[how] = interpolation_barrier(a2, b2, data)
    assert barriers["permutation"] < barriers["none"]
    assert barriers["permutation+gauge"] <= barriers["permutation"] + 1e-9
