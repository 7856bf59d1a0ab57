"""Property-based: random compositions of supported layers → `symmetries` → the group keeps
the function, obeys the group laws, and its orbit tangents lie in the kernel of the
Jacobian. Each drawn model is small, so the whole file runs in seconds."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jvp

import gaugenet

F64 = torch.float64

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.2),
    "prelu-free": lambda: nn.LeakyReLU(1.0),  # the identity: everything between is linear
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


@st.composite
def mlps(draw) -> nn.Sequential:
    widths = draw(st.lists(st.integers(1, 5), min_size=2, max_size=4))
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b, bias=draw(st.booleans())))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]())
            if draw(st.integers(0, 4)) == 0:
                layers.append(nn.LayerNorm(b) if b > 1 else nn.Identity())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return nn.Sequential(*layers).to(F64).eval()


@st.composite
def cnns(draw) -> nn.Sequential:
    c1, c2 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    pool = draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Identity()]))
    norm = draw(st.booleans())
    layers = [nn.Conv2d(2, c1, 3, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(c1))
    layers += [nn.ReLU(), pool, nn.Conv2d(c1, c2, 1), nn.ReLU(), nn.Flatten()]
    torch.manual_seed(draw(st.integers(0, 2**16)))
    m = nn.Sequential(*layers).to(F64).eval()
    if norm:
        bn = m[1]
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return m


def _inputs(model: nn.Sequential) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    first = model[0]
    if isinstance(first, nn.Conv2d):
        return torch.randn(6, 2, 4, 4, dtype=F64, generator=g)
    return torch.randn(16, first.in_features, dtype=F64, generator=g)


def _check(model: nn.Sequential) -> None:
    x = _inputs(model)
    group = gaugenet.symmetries(model, x)
    internal = [b for b in group.breakers if "internal error" in b.reason]
    assert not internal, internal  # discovery never offers a factor that fails its check
    gen = torch.Generator().manual_seed(1)
    g, h = group.sample(gen), group.sample(gen)
    moved = group.act(model, g)
    assert gaugenet.invariance_error(model, moved, x) < 1e-9
    both = group.act(model, group.compose(g, h))
    assert gaugenet.invariance_error(group.act(moved, h), both, x) < 1e-9
    back = group.act(moved, group.inverse(g))
    for p, q in zip(model.parameters(), back.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    if group.dim == 0:
        return
    # every orbit tangent T satisfies J T = 0: a forward-mode derivative along each row
    tangents = group.tangent(model)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(*flat):
        return functional_call(model, {**buffers, **dict(zip(names, flat))}, (x,))

    y = f(*params.values())
    scale = float(y.abs().max()) + 1e-300
    for t in tangents:
        parts, offset = [], 0
        for p in params.values():
            parts.append(t[offset : offset + p.numel()].reshape(p.shape).to(F64))
            offset += p.numel()
        _, dy = jvp(f, tuple(params.values()), tuple(parts))
        assert float(dy.abs().max()) <= 1e-8 * scale * max(1.0, float(t.abs().max()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlps())
def test_random_mlps(model: nn.Sequential) -> None:
    _check(model)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cnns())
def test_random_cnns(model: nn.Sequential) -> None:
    _check(model)


def test_the_checks_can_fail() -> None:
    """Negative: a rescaling that skips the next layer changes the outputs, and its
    tangent does not lie in ker J."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(F64)
    x = _inputs(model)
    wrong = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrong["0.weight"][1] *= 3.0
    wrong["0.bias"][1] *= 3.0
    y0 = model(x)
    y1 = functional_call(model, wrong, (x,))
    assert float((y1 - y0).abs().max() / y0.abs().max()) > 1e-3
