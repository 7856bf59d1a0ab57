"""Small example networks of each family, with random weights (for tests, docs and the report)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._graph_conv import GraphConv, normalized_adjacency

__all__ = ["example_cnn", "example_gcn", "mlp"]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "relu6": nn.ReLU6,
    "identity": nn.Identity,
}


def mlp(
    widths: Sequence[int],
    activation: str = "relu",
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> nn.Sequential:
    """`Linear -> act -> ... -> Linear` with the given widths; `activation` is one of
    `relu, leaky_relu, prelu, tanh, gelu, sigmoid, relu6, identity`."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(
                nn.PReLU(b, init=0.2) if activation == "prelu" else _ACTIVATIONS[activation]()
            )
    return nn.Sequential(*layers).to(dtype)


def example_cnn(*, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    """A small 2-D CNN with eval-mode BatchNorm, ReLU, LeakyReLU, PReLU and max, average and
    LP pooling; input `(batch, 3, 12, 12)`, output `(batch, 5)`. BatchNorm statistics and
    affine parameters are randomized so that they matter."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 7, 1),
        nn.PReLU(7, init=0.3),
        nn.LPPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(7, 9),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(9, 5),
    ).to(dtype)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return net.eval()


def example_gcn(
    n_nodes: int = 9,
    widths: Sequence[int] = (4, 6, 5, 3),
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> nn.Sequential:
    """`GraphConv -> ReLU -> ... -> GraphConv` on a random symmetric graph."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n_nodes, n_nodes, generator=g) < 0.35).to(dtype)
    a = ((a + a.T) > 0).to(dtype)
    a.fill_diagonal_(0)
    adj = normalized_adjacency(a)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (p, q) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(GraphConv(p, q, adj))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, GraphConv) and m.bias is not None:
                m.bias.normal_()
    return net
