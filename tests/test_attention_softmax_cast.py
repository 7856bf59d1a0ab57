"""Attention written out (`softmax(Q Kᵀ) V`) with a cast after the softmax, as eager Hugging
Face attention does (`softmax(...).to(v.dtype)`): under `torch.export` the cast comes with
a dtype check that reads the probabilities too, and the core is still found from the graph
(its query-key and value-output groups), giving a complete group."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import gaugenet
from gaugenet.attention._factors import QKFactor, VOFactor

F64 = torch.float64
D, H, T = 6, 2, 5


class Attention(nn.Module):
    """One causal attention layer on `(batch, T, D)` inputs, 2 heads, softmax cast to the
    values' dtype; a shape check that `torch.fx` cannot trace sends the capture through
    `torch.export`."""

    def __init__(self, cast: bool = True) -> None:
        super().__init__()
        self.cast = cast
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        self.register_buffer("mask", torch.zeros(T, T).masked_fill(~causal, -1e9))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > T:
            raise ValueError("sequence longer than the mask")
        split = lambda z: z.reshape(-1, T, H, D // H).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = q @ k.transpose(-1, -2) / math.sqrt(D // H) + self.mask.to(x.dtype)
        p = torch.softmax(s, dim=-1)
        if self.cast:
            p = p.to(v.dtype)
        return self.o((p @ v).transpose(1, 2).reshape(-1, T, D))


def _model(cast: bool = True) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    x = torch.randn(30, T, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    return Attention(cast).to(F64), x


def test_attention_with_a_cast_softmax_is_found_and_complete() -> None:
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    (qk,) = [f for f in group.factors if isinstance(f, QKFactor)]
    (vo,) = [f for f in group.factors if isinstance(f, VOFactor)]
    assert qk.dim == vo.dim == H * (D // H) ** 2
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete", report  # dim = n − rank J
    assert report.worst_residual < 1e-12
    # the same as the attention without the cast
    plain, _ = _model(cast=False)
    assert group.dim == gaugenet.symmetries(plain, x).dim
    for seed in (2, 3):
        moved = group.act(model, group.sample(torch.Generator().manual_seed(seed)))
        assert gaugenet.invariance_error(model, moved, x) < 1e-12
        assert not torch.allclose(moved.q.weight, model.q.weight)


def test_a_query_key_element_applied_to_the_queries_alone_changes_the_outputs() -> None:
    """The query-key factor's element with the key weights left as they were: the scores
    change."""
    model, x = _model()
    group = gaugenet.symmetries(model, x)
    (qk,) = [f for f in group.factors if isinstance(f, QKFactor)]
    g = qk.sample(torch.Generator().manual_seed(4))
    only = gaugenet.GaugeGroup((qk,), (), group.param_names)
    moved = only.act(model, {qk.name: g})
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    with torch.no_grad():
        moved.k.weight.copy_(model.k.weight)
        moved.k.bias.copy_(model.k.bias)
    assert not torch.allclose(moved.q.weight, model.q.weight)
    assert gaugenet.invariance_error(model, moved, x) > 1e-3
