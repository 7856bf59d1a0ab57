"""Hugging Face BERT-style encoders: the attention gauge group of every layer.

A BERT attention block is `attention.self` (`query`, `key`, `value` `Linear`s, softmax over
keys) followed by `attention.output.dense`; the value-output pair spans the two. The
LayerNorms add the shifts and kernels of `_hf_norms.py`; GELU and the LayerNorms' scales
break everything else (listed as breakers).

Position information that enters the scores between `W_q` and `W_k` (rotary embeddings,
relative-position terms) restricts `A`; such layers keep their value-output factor and report
the query-key factor as broken rather than claim a wrong symmetry.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..discovery._centering import link_centered
from ..discovery._kernel import link_kernels
from ..groups import Breaker, GaugeGroup
from ._factors import attention_factors
from ._hf_norms import bert_norm_factors
from ._layout import HeadLayout, Slot

__all__ = ["bert_group", "rotary_reason"]


def _is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def rotary_reason(model: nn.Module, attn: nn.Module | None = None) -> str | None:
    """Why position information sits between `W_q` and `W_k`, or `None`."""
    cfg = getattr(model, "config", None)
    pet = getattr(cfg, "position_embedding_type", None) or getattr(
        attn, "position_embedding_type", None
    )
    if pet in ("rotary", "relative_key", "relative_key_query"):
        return (
            f"position_embedding_type={pet!r} makes the scores depend on positions between "
            "W_q and W_k: only A commuting with it would be a symmetry; reported broken"
        )
    if getattr(cfg, "rope_theta", None) is not None or getattr(cfg, "rotary_dim", None):
        return (
            "rotary position embeddings (config has rope parameters): only A commuting with "
            "the rotations would be a symmetry; reported broken"
        )
    for name, m in model.named_modules():
        if "rotary" in type(m).__name__.lower() or "rotary" in name.split(".")[-1].lower():
            return (
                f"rotary position embedding module {name or type(m).__name__}: only A "
                "commuting with the rotations would be a symmetry; reported broken"
            )
    return None


def _attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """`(name, self_attention, output_dense)` for every BERT-style attention block."""
    out = []
    for name, m in model.named_modules():
        sa, so = getattr(m, "self", None), getattr(m, "output", None)
        if not isinstance(sa, nn.Module) or not isinstance(so, nn.Module):
            continue
        if not all(isinstance(getattr(sa, a, None), nn.Linear) for a in ("query", "key", "value")):
            continue
        if isinstance(getattr(so, "dense", None), nn.Linear):
            out.append((name, sa, so.dense))
    return out


def bert_group(model: nn.Module, example_inputs: Any = None) -> GaugeGroup | None:
    """Model analyzer for Hugging Face BERT-style models (`BertModel`, `Bert*For*`)."""
    if not _is_hf(model):
        return None
    blocks = _attention_blocks(model)
    if not blocks:
        return None
    factors, breakers = [], []
    for name, sa, dense in blocks:
        p = f"{name}." if name else ""
        H, dh = sa.num_attention_heads, sa.attention_head_size
        d_out = dense.out_features
        lay = HeadLayout(
            f"{p}self".rstrip("."),
            H,
            dh,
            dh,
            Slot(f"{p}self.query.weight", 0, _bias(sa.query, f"{p}self.query.bias")),
            Slot(f"{p}self.key.weight", 0, _bias(sa.key, f"{p}self.key.bias")),
            Slot(f"{p}self.value.weight", 0, _bias(sa.value, f"{p}self.value.bias")),
            Slot(f"{p}output.dense.weight", 0, _bias(dense, f"{p}output.dense.bias")),
            "torch",
        )
        shapes = {n: tuple(t.shape) for n, t in model.named_parameters() if n.startswith(p)}
        if dense.in_features != H * dh or d_out < 1:
            breakers.append(Breaker(name, "output projection does not read the heads; skipped"))
            continue
        fs = attention_factors(
            lay, shapes, softmax=True, homogeneous=False, modules=(f"{p}self", f"{p}output.dense")
        )
        reason = rotary_reason(model, sa)
        if reason is not None:
            # drop qk and the head permutation's claim on it; vo stays exact
            breakers.append(Breaker(f"{p}self", reason))
            fs = [f for f in fs if f.name == lay.name("vo")]
        factors += fs
    layers = [name.rpartition(".")[0] for name, _, _ in blocks if name.endswith(".attention")]
    if len(layers) == len(blocks):
        norms, broken = bert_norm_factors(model, layers)
        factors = link_centered(link_kernels(factors + norms))
        breakers += broken
    breakers += [
        Breaker("intermediate.intermediate_act_fn", "GELU is not positively homogeneous"),
        Breaker(
            "LayerNorm",
            "LayerNorm fixes the scale and the basis of the residual stream (only its mean "
            "subtraction and shifts leave directions free)",
        ),
    ]
    names = tuple(n for n, _ in model.named_parameters())
    return GaugeGroup(tuple(factors), tuple(breakers), names)


def _bias(lin: nn.Linear, name: str) -> str | None:
    return name if lin.bias is not None else None
