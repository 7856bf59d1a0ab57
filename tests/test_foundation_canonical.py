"""Gauge fixing and alignment: idempotence, orbit independence, exact recovery."""

from __future__ import annotations

import pytest
import torch

import gaugenet
from gaugenet import GaugeError
from gaugenet._canonical import _scale_norms
from gaugenet.groups import model_state
from gaugenet.nets import LinearNetwork, example_cnn, mlp

MODELS = {
    "mlp": (lambda: mlp([5, 8, 7, 6, 3], "relu"), (4, 5)),
    "leaky_mlp": (lambda: mlp([5, 9, 3], "leaky_relu"), (4, 5)),
    "cnn": (example_cnn, (4, 3, 12, 12)),
    "linear_net": (lambda: LinearNetwork.random(3, 4), (4, 3)),
}


def _setup(name):
    make, shape = MODELS[name]
    model = make()
    x = torch.randn(*shape, dtype=torch.float64)
    return model, x, gaugenet.symmetries(model, x)


def _diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    ("name", "gauge"),
    [(n, "balanced") for n in MODELS] + [(n, "unit_in") for n in MODELS if n != "linear_net"],
)
def test_idempotent_and_orbit_independent(name, gauge, gen):
    model, x, group = _setup(name)
    c = gaugenet.canonicalize(model, gauge, group=group)
    assert gaugenet.invariance_error(model, c, x) < 1e-12
    assert _diff(gaugenet.canonicalize(c, gauge, group=group), c) < 1e-12
    for _ in range(3):
        other = group.act(model, group.sample(gen))
        assert _diff(gaugenet.canonicalize(other, gauge, group=group), c) < 1e-10


def test_balanced_equalizes_norms_and_minimizes():
    model, x, group = _setup("mlp")
    c = gaugenet.canonicalize(model, group=group)
    state = model_state(c)
    for f in group.of_kind("rescaling"):
        n_in, n_out = _scale_norms(f, state)
        assert float((n_in - n_out).abs().max() / n_in.max()) < 1e-12
    total = sum(float((p**2).sum()) for p in c.parameters())
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        moved = group.act(c, group.sample(gen, discrete=False, scale=0.05))
        assert sum(float((p**2).sum()) for p in moved.parameters()) > total


def test_unit_in_has_unit_incoming_norms():
    model, x, group = _setup("mlp")
    c = gaugenet.canonicalize(model, "unit_in", group=group)
    for f in group.of_kind("rescaling"):
        n_in, _ = _scale_norms(f, model_state(c))
        assert torch.allclose(n_in, torch.ones_like(n_in), atol=1e-13)


@pytest.mark.parametrize("name", list(MODELS))
def test_align_recovers_hidden_element(name, gen):
    model, x, group = _setup(name)
    for _ in range(3):
        g = group.sample(gen)
        h = gaugenet.align(model, group.act(model, g), group=group)
        for k in g:
            assert float((h[k].double() - g[k].double()).abs().max()) <= 1e-10, k


def test_align_rejects_inequivalent_models():
    a = mlp([5, 8, 3], seed=0)
    b = mlp([5, 8, 3], seed=1)
    with pytest.raises(GaugeError, match="not gauge-equivalent"):
        gaugenet.align(a, b)
