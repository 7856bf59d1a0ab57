"""`F.rms_norm` (torch's `nn.RMSNorm`, which both captures keep as one call) written out as
the operations it computes, `x · rsqrt(mean(x², dims) + ε) · γ`, the form the arithmetic
rules and the residual-stream rotations read (as they read the RMSNorms that Hugging Face
models write out themselves). `ε = None` is the input dtype's machine epsilon, as in
`F.rms_norm`; the capture has no values, so the dtype of `γ` (or float32 without `γ`)
stands for it: the analysis reads `+ ε` as breaking the input's scale whatever its size,
and the checks run the model itself.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["expand_rms_norms"]

aten = torch.ops.aten
_RMS_NORM = {F.rms_norm, torch.rms_norm, aten.rms_norm.default}


def _eps(eps, weight: fx.Node | None, root: nn.Module) -> float:
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        return float(eps)
    dtype = torch.float32
    if weight is not None and weight.op == "get_attr":
        with contextlib.suppress(AttributeError, TypeError):
            dtype = root.get_parameter(str(weight.target)).dtype
    return torch.finfo(dtype).eps


def expand_rms_norms(gm: fx.GraphModule, root: nn.Module) -> int:
    """Rewrite every `rms_norm` call of `gm` in place; returns how many were rewritten.
    `root` holds the parameters the graph names."""
    count = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _RMS_NORM:
            continue
        names = ("input", "normalized_shape", "weight", "eps")
        given = {**dict(zip(names, n.args)), **n.kwargs}
        x, shape, weight = given["input"], given["normalized_shape"], given.get("weight")
        if isinstance(shape, int):
            shape = (shape,)
        dims = [-i for i in range(len(shape), 0, -1)]
        eps = _eps(given.get("eps"), weight, root)
        with gm.graph.inserting_before(n):
            sq = gm.graph.call_function(aten.pow.Tensor_Scalar, (x, 2))
            ms = gm.graph.call_function(torch.mean, (sq, dims, True))
            shifted = gm.graph.call_function(torch.add, (ms, eps))
            r = gm.graph.call_function(aten.rsqrt.default, (shifted,))
            y = gm.graph.call_function(torch.mul, (x, r))
            if weight is not None:
                y = gm.graph.call_function(torch.mul, (y, weight))
        n.replace_all_uses_with(y)
        gm.graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count
