"""Attention on heads folded into the batch: `bmm`/`baddbmm` over `(batch·heads, tokens, dim)`.

Some attentions (BLOOM, fairseq-style code) reshape each head's queries, keys and values to
`(batch·heads, tokens, dim)`, batch-major (entry `b·H + h`), and compute the scores with
`torch.bmm(Q, Kᵀ)` or `torch.baddbmm(bias, Q, Kᵀ, beta=β, alpha=α)`, i.e.
`β·bias + α·Q Kᵀ`, where the bias is a position bias per head (ALiBi's `m_h · s` for key
position `s`). The scores may be viewed as `(batch, heads, queries, keys)` for a mask and
the softmax, and the probabilities viewed back before `bmm` with the values. This module
holds what the attention pattern (`_attention.py`) needs to read that layout:

- the scores product (`bmm`, `matmul`, `baddbmm`) with its queries, transposed keys and
  added bias,
- the views between scores, softmax and values that only fold or unfold leading axes,
- the batch size that unfolds a core input (`batch·heads`) back into `(batch, heads)`.

Everything else (the maps measured from the projections, the factors) is the 4-d pattern's.
The fold is never assumed: the unfolded maps must be the same for every batch entry and act
token by token, which `_attention_trace.py` checks, so a head-major fold (`h·B + b`) is
refused there rather than misread.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx

__all__ = [
    "fold_batch",
    "folds_leading",
    "head_varying",
    "scores_product",
    "untranspose_last",
]

aten = torch.ops.aten
_BMM = {torch.matmul, operator.matmul, aten.matmul.default, torch.bmm, aten.bmm.default}
_BADDBMM = {torch.baddbmm, aten.baddbmm.default}
_VIEWS = {torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_VIEW_METHODS = {"reshape", "view"}


def scores_product(s: Any) -> tuple[Any, Any, tuple[fx.Node, ...]] | None:
    """`(queries, transposed keys, added)` when `s` computes scores as a product of queries
    and transposed keys: `matmul`/`bmm(Q, Kᵀ)`, or `baddbmm(bias, Q, Kᵀ)` (a function or
    the tensor method, arguments positional or named), whose `bias` is `added`."""
    if not isinstance(s, fx.Node):
        return None
    if s.op == "call_function" and s.target in _BMM:
        return s.args[0], s.args[1], ()
    baddbmm = (s.op == "call_function" and s.target in _BADDBMM) or (
        s.op == "call_method" and s.target == "baddbmm"
    )
    if not baddbmm:
        return None
    names = ("input", "batch1", "batch2")
    got = [s.args[i] if len(s.args) > i else s.kwargs.get(k) for i, k in enumerate(names)]
    bias, q, kt = got
    if q is None or kt is None:
        return None
    return q, kt, (bias,) if isinstance(bias, fx.Node) else ()


def _is_view(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _VIEWS
    return n.op == "call_method" and n.target in _VIEW_METHODS


def folds_leading(n: Any, values: dict) -> bool:
    """`n` is a view of scores or probabilities that keeps their last two axes (queries,
    keys) and only folds or unfolds the leading ones: `(B·H, T, S) ↔ (B, H, T, S)`."""
    if not (isinstance(n, fx.Node) and _is_view(n)):
        return False
    a, b = values.get(n.args[0]), values.get(n)
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return False
    return a.ndim >= 3 and b.ndim >= 3 and a.shape[-2:] == b.shape[-2:]


def untranspose_last(kt: Any, values: dict) -> fx.Node | None:
    """`K` from `Kᵀ`, a transpose of the last two axes of `K` (whatever its rank)."""
    if not isinstance(kt, fx.Node) or len(kt.args) < 3:
        return None
    if kt.target not in (torch.transpose, aten.transpose.int, "transpose"):
        return None
    k = kt.args[0]
    v = values.get(k)
    if not isinstance(v, Tensor) or v.ndim < 2:
        return None
    dims = kt.args[1:3]
    if not all(isinstance(d, int) for d in dims):
        return None
    return k if sorted(d % v.ndim for d in dims) == [v.ndim - 2, v.ndim - 1] else None


def fold_batch(projected: Tensor, core_input: Tensor) -> int:
    """The batch size `B` of a core input `(B·H, T, dh)` whose projection output is
    `(B, T, F)` or `(B·T, F)`: the leading axis of the one, or its rows over `T`. `0` when
    the shapes do not fit that layout."""
    n, t = core_input.shape[0], core_input.shape[-2]
    if projected.ndim == 3:
        b = projected.shape[0]
    elif projected.ndim == 2 and projected.shape[0] % t == 0:
        b = projected.shape[0] // t
    else:
        return 0
    return b if b > 0 and n % b == 0 else 0


def head_varying(v: Any, heads: int, folded: int) -> bool:
    """`v`, added to the scores, differs between heads: its heads axis is the third from the
    end (`(…, heads, queries, keys)`), or, on folded scores (`folded = B·H` rows, batch
    major), its third axis from the end holds all `B·H` rows and is unfolded first."""
    if not isinstance(v, Tensor) or v.ndim < 3 or heads < 2:
        return False
    if folded and v.shape[-3] == folded and folded != heads:
        v = v.unflatten(-3, (folded // heads, heads))
    elif v.shape[-3] != heads:
        return False
    return not bool((v == v.narrow(-3, 0, 1)).all())
