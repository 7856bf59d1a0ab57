"""Graph convolution `H' = Â H W + b` (Kipf-Welling), the graph analogue of eq. (52)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._errors import GaugeError

__all__ = ["GraphConv", "normalized_adjacency"]


def normalized_adjacency(adj: Tensor) -> Tensor:
    """`Â = D^{-1/2} (A + 1) D^{-1/2}` for a symmetric adjacency matrix `A` of shape `(n, n)`."""
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise GaugeError(f"adjacency must be square, got shape {tuple(adj.shape)}")
    if not torch.allclose(adj, adj.T):
        raise GaugeError("adjacency must be symmetric")
    a = adj + torch.eye(adj.shape[0], dtype=adj.dtype)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


class GraphConv(nn.Module):
    """One graph convolution `H' = Â H W + b` (the activation `φ` is a separate module).

    **Arguments:**

    - `in_features`, `out_features`: channel counts.
    - `adjacency`: `(n, n)` normalized adjacency `Â` (a buffer, not trained).
    - `bias`: whether to add a per-channel bias `b`.

    `forward(h)`: `h` of shape `(..., n, in_features)` to `(..., n, out_features)`.
    Because `Â` mixes nodes and `W` mixes channels, a positive per-channel scale of the output
    passes through any positively homogeneous `φ` into the next layer's `W`: the same
    rescaling symmetry as eq. (29) and (52).
    """

    def __init__(
        self, in_features: int, out_features: int, adjacency: Tensor, *, bias: bool = True
    ) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features, bias=False)
        self.register_buffer("adjacency", adjacency.clone())
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, h: Tensor) -> Tensor:
        out = torch.matmul(self.adjacency, self.lin(h))
        if self.bias is not None:
            out = out + self.bias
        return out
