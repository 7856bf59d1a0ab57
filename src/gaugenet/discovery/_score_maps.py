"""Elementwise maps of attention scores before the softmax (Gemma 2's soft-capping
`c · tanh(s / c)`).

A map applied entry by entry to the scores `s_ts = q_tᵀ k_s` sees the queries and keys only
through that bilinear form, so whatever keeps every `q_tᵀ k_s` keeps its output: the
query-key `GL` per head (and its subalgebra under rotary embeddings) holds as without it,
with the key bias transformed along with the key weights. What it breaks is the softmax's
indifference to a constant per query added before it: `tanh(s + a) − tanh(s)` depends on
`s`, so a shift of the key bias (which adds `q_tᵀ c` to every score of query `t`) is no
symmetry, nor is a constant a LayerNorm's `β` or kernel adds to every key. Constants added
after the map (masks) still reach the softmax unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["SCORE_MAPS"]

aten = torch.ops.aten

#: elementwise nonlinear maps allowed between the scores matmul and the softmax
SCORE_MAPS = {
    torch.tanh,
    aten.tanh.default,
    torch.sigmoid,
    aten.sigmoid.default,
    "tanh",
    "sigmoid",
}
