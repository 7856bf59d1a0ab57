"""Discovery on graphs: random group elements keep outputs; breakers are named."""

from __future__ import annotations

import pytest
import torch

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from zoo import ZOO


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_random_elements_keep_outputs(entry, gen) -> None:
    model, x = entry.build(), entry.inputs(torch.Generator().manual_seed(0))[:16]
    group = gaugenet.symmetries(model, x)
    # no factor was offered that the self-check had to drop (a wrong answer of discovery)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    g = group.sample(gen, dtype=torch.float64)
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-9
    # negative: perturbing the weights along a random direction changes the outputs
    bumped = group.act(model, group.identity())
    with torch.no_grad():
        for p in bumped.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    assert gaugenet.invariance_error(model, bumped, x) > 1e-4


def test_lowrank_has_gl_and_resnet_has_shifts() -> None:
    by = {e.name: e for e in ZOO}
    low = by["lowrank"]
    group = gaugenet.symmetries(low.build(), low.inputs(torch.Generator().manual_seed(0)))
    assert [f.dim for f in group.of_kind("gl")] == [4]
    res = by["resnet"]
    group = gaugenet.symmetries(res.build(), res.inputs(torch.Generator().manual_seed(0)))
    assert sorted(f.name for f in group.of_kind("translation")) == [
        "shift:0.block.conv1",
        "shift:0.block.conv2",
    ]


def _state_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_group_axioms_on_the_zoo(entry, gen) -> None:
    """Composition and inverses are exact on every zoo model, including factors that do not
    commute (bias shifts against rescalings and GL factors)."""
    model, x = entry.build(), entry.inputs(gen)
    group = gaugenet.symmetries(model, x)
    for _ in range(3):
        g, h = group.sample(gen), group.sample(gen)
        both = group.act(model, group.compose(g, h))
        assert _state_diff(group.act(group.act(model, g), h), both) < 1e-10
        assert _state_diff(group.act(group.act(model, g), group.inverse(g)), model) < 1e-10
