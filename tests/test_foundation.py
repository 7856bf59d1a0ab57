"""The foundation: group axioms, invariance, negative tests, tangents (eq. 29-34, 52)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet import GaugeError
from gaugenet.nets import LinearNetwork, example_cnn, example_gcn, mlp


def _cases():
    return {
        "relu_mlp": (lambda: mlp([5, 8, 7, 3], "relu"), (16, 5)),
        "leaky_mlp": (lambda: mlp([5, 8, 7, 3], "leaky_relu"), (16, 5)),
        "prelu_mlp": (lambda: mlp([5, 8, 7, 3], "prelu"), (16, 5)),
        "linear_net": (lambda: LinearNetwork.random(4, 5), (16, 4)),
        "cnn": (example_cnn, (6, 3, 12, 12)),
        "gcn": (example_gcn, (3, 9, 4)),
    }


CASES = _cases()


def _build(name: str, dtype=torch.float64):
    make, shape = CASES[name]
    model = make().to(dtype)
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
    return model, x


def _state_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@pytest.mark.parametrize("name", list(CASES))
def test_invariance_100_random_elements_float64(name, gen):
    model, x = _build(name)
    group = gaugenet.symmetries(model, x)
    assert group.dim > 0
    worst = max(
        gaugenet.invariance_error(model, group.act(model, group.sample(gen)), x) for _ in range(100)
    )
    assert worst <= 1e-12


@pytest.mark.parametrize("name", list(CASES))
def test_invariance_float32(name, gen):
    model, x = _build(name, torch.float32)
    group = gaugenet.symmetries(model, x)
    worst = max(
        gaugenet.invariance_error(
            model, group.act(model, group.sample(gen, dtype=torch.float32)), x, dtype=torch.float32
        )
        for _ in range(20)
    )
    assert worst <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_group_axioms(name, gen):
    model, x = _build(name)
    group = gaugenet.symmetries(model, x)
    e = group.identity()
    assert _state_diff(group.act(model, e), model) == 0.0
    for _ in range(5):
        g, h, k = group.sample(gen), group.sample(gen), group.sample(gen)
        # composition: acting by g then h equals acting by compose(g, h)
        assert (
            _state_diff(group.act(group.act(model, g), h), group.act(model, group.compose(g, h)))
            < 1e-12
        )
        # inverse
        assert _state_diff(group.act(group.act(model, g), group.inverse(g)), model) < 1e-12
        # associativity
        lhs = group.compose(group.compose(g, h), k)
        rhs = group.compose(g, group.compose(h, k))
        assert _state_diff(group.act(model, lhs), group.act(model, rhs)) < 1e-12


def test_act_never_modifies_its_input(gen):
    model, x = _build("cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    group = gaugenet.symmetries(model, x)
    group.act(model, group.sample(gen))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mlp_dim_is_number_of_hidden_units():
    model = mlp([5, 8, 7, 3], "relu")
    group = gaugenet.symmetries(model)
    assert group.dim == 8 + 7
    assert [f.kind for f in group.factors].count("permutation") == 2
    assert sorted(f.n for f in group.of_kind("permutation")) == [7, 8]


def test_linear_network_group_is_affine_at_interior_layers():
    net = LinearNetwork.random(4, 5)
    group = gaugenet.symmetries(net)
    assert [f.kind for f in group.factors] == ["affine"] * 4
    assert group.dim == 4 * (16 + 4)


def test_cnn_factors_and_batchnorm():
    model, x = _build("cnn")
    group = gaugenet.symmetries(model, x)
    names = {f.name: f.dim for f in group.factors if f.dim}
    # conv0 scale absorbed by BatchNorm, BatchNorm output against conv4, conv4, conv7, linear11,
    # and conv0's bias, which BatchNorm's shift absorbs
    assert names == {
        "scale:0": 6,
        "scale:1:out": 6,
        "scale:4": 8,
        "scale:7": 7,
        "scale:11": 9,
        "shift:0": 6,
    }
    assert group.breakers == ()


def test_gcn_rescaling_per_channel():
    model, x = _build("gcn")
    group = gaugenet.symmetries(model, x)
    assert group.dim == 6 + 5


@pytest.mark.parametrize("act", ["tanh", "gelu", "sigmoid", "relu6"])
def test_rescaling_breaks_nonhomogeneous_activations(act, gen):
    relu = mlp([5, 8, 7, 3], "relu")
    other = mlp([5, 8, 7, 3], act)
    x = torch.randn(32, 5, dtype=torch.float64, generator=gen) * 3
    relu_group = gaugenet.symmetries(relu)
    group = gaugenet.symmetries(other)
    assert group.of_kind("rescaling") == []
    assert any("homogeneous" in b.reason or "clips" in b.reason for b in group.breakers)
    g = relu_group.sample(gen, discrete=False, scale=1.0)
    # the ReLU network's group refuses the other network ...
    with pytest.raises(gaugenet.GaugeError, match="found for another model"):
        relu_group.act(other, g)
    # ... rightly: the same parameter transformation, forced on it, changes its function
    moved = relu_group.act(other, g, check=False)
    assert gaugenet.invariance_error(other, moved, x) > 1e-3
    # permutations survive any elementwise activation
    assert len(group.of_kind("permutation")) == 2
    assert gaugenet.invariance_error(other, group.act(other, group.sample(gen)), x) < 1e-12


def test_linear_network_boundary_violation_changes_output(gen):
    net = LinearNetwork.random(3, 4, generator=gen)
    x = torch.randn(8, 3, dtype=torch.float64, generator=gen)
    Gs = [
        torch.eye(3, dtype=torch.float64)
        + 0.3 * torch.randn(3, 3, dtype=torch.float64, generator=gen)
        for _ in range(5)
    ]
    cs = [torch.randn(3, dtype=torch.float64, generator=gen) for _ in range(5)]
    with pytest.raises(GaugeError, match="G_0"):
        net.gauge_transform(Gs, cs)
    # the same formula (eq. 33) applied by hand with G_0 != 1 changes the output
    ws = [torch.linalg.solve(Gs[n + 1], w.detach() @ Gs[n]) for n, w in enumerate(net.weights)]
    bs = [
        torch.linalg.solve(Gs[n + 1], b.detach() + w.detach() @ cs[n] - cs[n + 1])
        for n, (w, b) in enumerate(zip(net.weights, net.biases))
    ]
    assert gaugenet.invariance_error(net, LinearNetwork(ws, bs), x) > 1e-3
    # with the boundary fixed it is a symmetry, and eq. (34) holds for the new network
    Gs[0] = Gs[-1] = torch.eye(3, dtype=torch.float64)
    cs[0] = cs[-1] = torch.zeros(3, dtype=torch.float64)
    new = net.gauge_transform(Gs, cs)
    assert gaugenet.invariance_error(net, new, x) < 1e-12
    assert float((new.closed_form(x) - net(x)).detach().abs().max()) < 1e-12


def test_tangent_orthogonal_to_loss_gradient_on_digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:400], dtype=torch.float64) / 16
    y = torch.tensor(data.target[:400])
    model = mlp([64, 32, 16, 10], "relu", seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    tangent = gaugenet.symmetries(model).tangent(model)
    assert tangent.shape == (32 + 16, grad.numel())
    cos = (tangent @ grad) / (tangent.norm(dim=1) * grad.norm())
    assert float(cos.abs().max()) <= 1e-10
    # negative: the same directions on a GELU network (no symmetry) are not orthogonal
    relu_group = gaugenet.symmetries(model)
    gelu = mlp([64, 32, 16, 10], "gelu", seed=3)
    gelu.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(gelu(x), y).backward()
    g2 = torch.cat([p.grad.reshape(-1) for p in gelu.parameters()])
    t2 = relu_group.tangent(gelu)
    assert float(((t2 @ g2) / (t2.norm(dim=1) * g2.norm())).abs().max()) > 1e-4


def test_tangent_matches_finite_difference(gen):
    model, x = _build("cnn")
    group = gaugenet.symmetries(model, x)
    T = group.tangent(model)
    xi = torch.randn(group.dim, dtype=torch.float64, generator=gen)
    s = 1e-6
    base = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    moved = group.act(model, group.exp(s * xi))
    new = torch.cat([p.detach().reshape(-1) for p in moved.parameters()])
    fd = (new - base) / s
    assert float((fd - xi @ T).abs().max() / fd.abs().max()) < 1e-5
