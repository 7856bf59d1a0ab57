"""Attention: `nn.MultiheadAttention` as a module (its own factors come from its analyzer in
`gaugenet.attention`; the rule passes its inputs' scales into the packed projection), and the
attention pattern found in the graph (`matmul → softmax → matmul` or
`scaled_dot_product_attention`: per-head query-key and value-output GL, key and value
shifts, head permutations; code in `_attention.py`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from .._attention import attention_from_graph
from .._labels import FIXED
from ._common import Unsupported, fixed, is_float
from ._examples import batch, seeded
from ._rule import Example, Rule

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["RULES"]


def multihead_attention(prop: Propagator, n: fx.Node, out: Any) -> Any:
    """`nn.MultiheadAttention`: a per-feature scale of the query, key or value input passes
    into the matching columns of the packed input projection
    (`in_proj_weight[:, j] ↦ in_proj_weight[:, j] / s_j`), which commutes with the
    attention's own factors (they act on rows). The output is fixed. Returns labels for
    `(attn_output, attn_weights)`."""
    m = prop.submodule(n)
    L = prop.L
    if not m._qkv_same_embed_dim or len(n.args) < 3 or m.bias_k is not None:
        raise Unsupported("attention without a packed input projection")
    E = m.embed_dim
    idx = torch.full((3 * E, E), FIXED, dtype=torch.long)
    for i, a in enumerate(n.args[:3]):
        lab = prop.lab(a)
        if lab is None:
            continue
        s, p = lab
        L.fix_perms(p, n.name, "attention mixes its input features")
        cols = L.per_channel(s, -1)
        if s.shape[-1] != E or any(len(c) != 1 for c in cols):
            L.fix_scales(s, n.name, "attention input scales vary across tokens")
            continue
        idx[i * E : (i + 1) * E] = torch.tensor([int(c[0]) for c in cols])[None, :]
    name = str(n.target)
    prop.use_param(f"{name}.in_proj_weight", name)
    L.scale_terms.append((f"{name}.in_proj_weight", idx, -1))
    first = fixed(out[0]) if is_float(out[0]) else None
    second = fixed(out[1]) if len(out) > 1 and is_float(out[1]) else None
    return [first[0] if first else None, second[0] if second else None], [
        first[1] if first else None,
        second[1] if second else None,
    ]


# -- examples ---------------------------------------------------------------------------------
class _MHA(nn.Module):
    """ReLU features read as query, key and value by `nn.MultiheadAttention` (4 wide, 2 heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        return self.attn(h, h, h, need_weights=False)[0]


class _Manual(nn.Module):
    """Attention written out (matmul, scale, softmax, matmul), 4 wide, 2 heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(B, T, 2, 2).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(2), dim=-1)
        return self.o(torch.matmul(a, v).transpose(1, 2).reshape(B, T, 4))


RULES = (
    Rule(
        "multihead attention",
        "attention",
        multihead_attention,
        (
            Example(
                lambda: (seeded(_MHA), batch(64, 5, 3)),
                28,
                "per head: query-key GL(2) 4, value-output GL(2) 4, key bias 2, value bias 2 "
                "(24); the ReLU features' 4 scales pass into the packed projection",
            ),
        ),
        modules=(nn.MultiheadAttention,),
        several_outputs=True,
    ),
    Rule(
        "attention pattern",
        "attention",
        None,
        (
            Example(
                lambda: (seeded(_Manual), batch(64, 5, 4)),
                24,
                "per head: query-key GL(2) 4, value-output GL(2) 4, key shift 2, value shift 2",
            ),
        ),
        where=f"`{attention_from_graph.__module__}.attention_from_graph`, after propagation",
    ),
)
