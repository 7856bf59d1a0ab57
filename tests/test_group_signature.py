"""A gauge group knows the model it was found for: `act`, `align`, `merge`, `canonicalize`
refuse a model of another computation, and accept copies, reloads and other dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.apply import merge
from gaugenet.groups import check_model, model_signature
from gaugenet.io import load_model

F64 = torch.float64


def _pair(second: type[nn.Module] = nn.GELU) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(F64)
    other = nn.Sequential(nn.Linear(8, 16), second(), nn.Linear(16, 4)).to(F64)
    other.load_state_dict(relu.state_dict())
    return relu, other


def test_relu_group_refuses_gelu_model(gen) -> None:
    relu, gelu = _pair()
    x = torch.randn(32, 8, dtype=F64, generator=gen)
    group = gaugenet.symmetries(relu)
    g = group.sample(gen, discrete=False, scale=1.0)
    with pytest.raises(gaugenet.GaugeError, match=r"found for another model.*GELU.*ReLU"):
        group.act(gelu, g)
    with pytest.raises(gaugenet.GaugeError, match="found for another model"):
        gaugenet.canonicalize(gelu, group=group, example_inputs=x)
    with pytest.raises(gaugenet.GaugeError, match="found for another model"):
        gaugenet.canonical_element(gelu, group)
    with pytest.raises(gaugenet.GaugeError, match="found for another model"):
        gaugenet.align(relu, gelu, group=group)
    with pytest.raises(gaugenet.GaugeError, match="found for another model"):
        merge([relu, gelu], x, group=group)
    with pytest.raises(gaugenet.GaugeError, match="found for another model"):
        merge([relu, gelu], x)  # the group found for the first model refuses the second
    # the refusal is right: forced on the GELU model, the transformation changes its function
    forced = group.act(gelu, g, check=False)
    assert gaugenet.invariance_error(gelu, forced, x) > 1e-2
    # and the group of the ReLU model itself keeps its function
    assert gaugenet.invariance_error(relu, group.act(relu, g), x) < 1e-12


def test_other_shapes_and_configs_refused(gen) -> None:
    relu, _ = _pair()
    group = gaugenet.symmetries(relu)
    wider = nn.Sequential(nn.Linear(8, 17), nn.ReLU(), nn.Linear(17, 4)).to(F64)
    with pytest.raises(gaugenet.GaugeError, match=r"0\.weight has shape \(17, 8\)"):
        group.act(wider, {})
    leaky = [nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(s), nn.Linear(16, 4)) for s in (0.1, 0.2)]
    with pytest.raises(gaugenet.GaugeError, match="negative_slope=0.2"):
        gaugenet.symmetries(leaky[0]).act(leaky[1], {})

    class Functional(nn.Module):  # the same modules, a different computation in forward
        def __init__(self, act) -> None:
            super().__init__()
            self.a, self.b, self.act = nn.Linear(8, 16), nn.Linear(16, 4), act

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    f_relu, f_tanh = Functional(torch.relu), Functional(torch.tanh)
    with pytest.raises(gaugenet.GaugeError, match=r"act=<\S*tanh>"):
        gaugenet.symmetries(f_relu).act(f_tanh, {})


def test_copies_reloads_and_dtypes_accepted(tmp_path, gen) -> None:
    relu, _ = _pair()
    group = gaugenet.symmetries(relu)
    g = group.sample(gen)
    x = torch.randn(16, 8, dtype=F64, generator=gen)
    for same in (copy.deepcopy(relu), copy.deepcopy(relu).float(), group.act(relu, g)):
        assert gaugenet.invariance_error(same, group.act(same, g), x) < 1e-5
    # one architecture file loaded twice (fresh module, fresh classes): one signature
    (tmp_path / "arch.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)\n"
        "    def forward(self, x):\n"
        "        return self.b(self.a(x).relu())\n"
        "def net():\n"
        "    return Net()\n"
    )
    first, second = (load_model(f"{tmp_path / 'arch.py'}:net") for _ in range(2))
    assert type(first) is not type(second)
    assert model_signature(first) == model_signature(second)
    gaugenet.symmetries(first).act(second, {})


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(), "has no parameters"),
        (nn.Sequential(nn.Linear(4, 0), nn.ReLU(), nn.Linear(0, 2)), "zero width"),
        ("not a model", "expected a torch.nn.Module"),
    ],
)
def test_models_refused_before_analysis(model, match) -> None:
    with pytest.raises(gaugenet.GaugeError, match=match):
        check_model(model)
    with pytest.raises(gaugenet.GaugeError, match=match):
        gaugenet.symmetries(model)


def test_integer_model_refused() -> None:
    net = nn.Linear(4, 3)
    for p in net.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(torch.int32)
    with pytest.raises(gaugenet.GaugeError, match=r"dtype torch.int32.*float"):
        gaugenet.symmetries(net)
