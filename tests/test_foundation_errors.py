"""Bad input gets a clear GaugeError naming what and where."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet import GaugeError
from gaugenet.nets import LinearNetwork, mlp


def test_non_positive_scale_names_factor_and_entry():
    model = mlp([4, 6, 2])
    group = gaugenet.symmetries(model)
    g = group.identity()
    g["scale:0"] = torch.ones(6, dtype=torch.float64)
    g["scale:0"][3] = -0.5
    with pytest.raises(GaugeError, match=r"scale:0.*scale:0\[3\].*-0\.5"):
        group.act(model, g)
    g["scale:0"][3] = float("nan")
    with pytest.raises(GaugeError, match="not finite"):
        group.act(model, g)


def test_wrong_shape_and_unknown_factor():
    model = mlp([4, 6, 2])
    group = gaugenet.symmetries(model)
    with pytest.raises(GaugeError, match="shape"):
        group.act(model, {"scale:0": torch.ones(5, dtype=torch.float64)})
    with pytest.raises(GaugeError, match="unknown factors"):
        group.compose({"nope": torch.ones(1)}, group.identity())


def test_singular_matrix_and_bad_augmented_row():
    net = LinearNetwork.random(3, 3)
    group = gaugenet.symmetries(net)
    g = group.identity()
    g["affine:1"] = g["affine:1"].clone()
    g["affine:1"][0, :3] = 0
    with pytest.raises(GaugeError, match="affine:1.*singular"):
        group.act(net, g)
    g = group.identity()
    g["affine:2"] = g["affine:2"].clone()
    g["affine:2"][3, 0] = 1.0
    with pytest.raises(GaugeError, match="last row"):
        group.act(net, g)


def test_not_a_permutation():
    model = mlp([4, 6, 2])
    group = gaugenet.symmetries(model)
    with pytest.raises(GaugeError, match="not a permutation"):
        group.act(model, {"perm:0": torch.tensor([0, 0, 1, 2, 3, 4])})


def test_nan_weights_rejected():
    model = mlp([4, 6, 2])
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(GaugeError, match=r"0\.weight.*non-finite"):
        gaugenet.symmetries(model)


def test_untraceable_model_is_reported():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be captured
                return self.lin(x)
            return x

    with pytest.raises(gaugenet.UnsupportedModelError, match="Branchy"):
        gaugenet.symmetries(Branchy(), torch.randn(2, 3))


def test_conv_model_needs_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(GaugeError, match="example_inputs"):
        gaugenet.symmetries(model)


def test_linear_network_shape_mismatch():
    with pytest.raises(GaugeError, match="layer 1"):
        LinearNetwork([torch.eye(3), torch.eye(2)], [torch.zeros(3), torch.zeros(2)])


def test_batchnorm_in_training_mode_is_reported():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    group = gaugenet.symmetries(model, torch.randn(5, 3, dtype=torch.float64))
    assert any("training mode" in b.reason for b in group.breakers)
    assert "scale:0" not in {f.name for f in group.factors}


def test_layernorm_breaks_and_is_reported():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    group = gaugenet.symmetries(model)
    assert any("LayerNorm" in b.reason for b in group.breakers)
    assert "scale:0" not in {f.name for f in group.factors}
