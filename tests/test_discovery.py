"""Discovery on graphs: random group elements keep outputs; breakers are named."""

from __future__ import annotations

import pytest
import torch

import gaugenet
from zoo import ZOO


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_random_elements_keep_outputs(entry, gen) -> None:
    model, x = entry.build(), entry.inputs(torch.Generator().manual_seed(0))[:16]
    group = gaugenet.symmetries(model, x)
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
