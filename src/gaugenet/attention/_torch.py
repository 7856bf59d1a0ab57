"""The attention gauge group of `SelfAttention` and `nn.MultiheadAttention` (the layers around
them, e.g. in `nn.TransformerEncoderLayer`, are captured and analyzed like any other graph)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..groups import Breaker, GaugeGroup
from ._factors import attention_factors
from ._layout import HeadLayout, Slot

__all__ = [
    "mha_factors",
    "mha_layout",
    "self_attention_layout",
    "torch_model_group",
]


def _p(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def self_attention_layout(m: nn.Module, prefix: str = "") -> HeadLayout:
    """The `HeadLayout` of a `gaugenet.nets.SelfAttention`."""
    bias = m.b_q is not None

    def slot(w: str, b: str) -> Slot:
        return Slot(_p(prefix, w), 0, _p(prefix, b) if bias else None, 0)

    return HeadLayout(
        prefix,
        m.heads,
        m.head_dim,
        m.head_dim,
        slot("w_q", "b_q"),
        slot("w_k", "b_k"),
        slot("w_v", "b_v"),
        slot("w_o", "b_o"),
        "paper",
    )


def mha_layout(m: nn.MultiheadAttention, prefix: str = "") -> HeadLayout:
    """The `HeadLayout` of a `torch.nn.MultiheadAttention` (stacked or separate projections)."""
    E, H = m.embed_dim, m.num_heads
    bias = _p(prefix, "in_proj_bias") if m.in_proj_bias is not None else None
    if m._qkv_same_embed_dim:
        w = _p(prefix, "in_proj_weight")
        q, k, v = (Slot(w, i * E, bias, i * E) for i in range(3))
    else:
        q, k, v = (
            Slot(_p(prefix, f"{n}_proj_weight"), 0, bias, i * E) for i, n in enumerate("qkv")
        )
    o_bias = _p(prefix, "out_proj.bias") if m.out_proj.bias is not None else None
    o = Slot(_p(prefix, "out_proj.weight"), 0, o_bias)
    return HeadLayout(prefix, H, E // H, E // H, q, k, v, o, "torch")


def mha_factors(m: nn.MultiheadAttention, prefix: str = "") -> tuple[list, list]:
    """Analyzer for `nn.MultiheadAttention`: `(factors, breakers)`."""
    name = prefix or "<root>"
    if m.bias_k is not None or m.add_zero_attn:
        # the extra key/value token is not produced by W_k, W_v: not analyzed, so nothing claimed
        return [], [
            Breaker(
                name,
                "add_bias_kv / add_zero_attn: extra key-value tokens are not "
                "analyzed; no attention symmetry is reported",
            )
        ]
    shapes = {_p(prefix, n): tuple(p.shape) for n, p in m.named_parameters()}
    lay = mha_layout(m, prefix)
    return attention_factors(lay, shapes, softmax=True, homogeneous=False, modules=(name,)), []


def torch_model_group(model: nn.Module, example_inputs: Any = None) -> GaugeGroup | None:
    """Whole-model analyzer for attention modules given as the model itself (fx cannot trace
    their fast paths)."""
    from ..nets import SelfAttention

    names = tuple(n for n, _ in model.named_parameters())
    if isinstance(model, SelfAttention):
        f, b = model.gauge_factors("")
    elif isinstance(model, nn.MultiheadAttention):
        f, b = mha_factors(model, "")
    else:
        return None
    return GaugeGroup(tuple(f), tuple(b), names)
