"""LayerNorms written as primitive operations (`x − mean`, `mean((x − μ)²)`, `rsqrt`, `· γ`,
as Cohere's norm is), seen as the `nn.LayerNorm` they compute.

A module is taken for a LayerNorm only when its computation shows it, on numbers: it has
no submodules and no buffers, its parameters are `weight` (and `bias`) of one shape `(d,)`,
and, with random values put in place of those parameters, its output on random inputs (rows
of means up to three times their spread, and scales small enough that `eps` matters) equals
`F.layer_norm(x, (d,), weight, bias, eps)` to a relative `1e-5` (computations in float32
inside a float64 model pass; a norm without the centering, with `1 + w` as its gain, with an
unbiased variance or another `eps` misses by orders of magnitude more), for an `eps` among the
numbers its own graph adds. The name and class of the module play no part. The analysis
then sees it through the same view as a functional LayerNorm (`_functional_norms.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ._functional_norms import calls_by_module, install

__all__ = ["numeric_layernorm", "traced_numeric_norms"]

_TOL = 1e-5


def _constants(nodes: Iterable[fx.Node]) -> list[float]:
    """The positive numbers below one that the operations take (`eps` candidates)."""
    out = []
    for n in nodes:
        for a in (*n.args, *n.kwargs.values()):
            if isinstance(a, float) and 0 < a < 1 and math.isfinite(a):
                out.append(a)
    return list(dict.fromkeys(out))


def _inputs(d: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    """`(6, 4, d)` rows of scales from 1e-2 to 10 and means from −3 to 3 times the scale
    (means far above the spread would measure float32 cancellation, not the function)."""
    x = torch.randn(6, 4, d, generator=g, dtype=torch.float64)
    scale = torch.logspace(-2, 1, 6, dtype=torch.float64)[:, None, None]
    mean = torch.linspace(-3, 3, 4, dtype=torch.float64)[None, :, None]
    return ((x + mean) * scale).to(dtype)


def numeric_layernorm(owner: nn.Module, nodes: Iterable[fx.Node]) -> nn.LayerNorm | None:
    """The `nn.LayerNorm` (over the last axis, sharing `owner`'s parameters) that `owner`
    computes, `nodes` being its captured operations; `None` when the numbers do not show
    one."""
    if next(owner.children(), None) is not None or next(owner.buffers(), None) is not None:
        return None
    params = dict(owner.named_parameters())
    if set(params) not in ({"weight"}, {"weight", "bias"}):
        return None
    w = params["weight"]
    if w.ndim != 1 or not w.is_floating_point() or w.is_meta:
        return None
    if "bias" in params and params["bias"].shape != w.shape:
        return None
    d, dtype = w.shape[0], w.dtype
    eps = _constants(nodes)
    if d < 2 or not eps:
        return None
    g = torch.Generator().manual_seed(0)
    x = _inputs(d, dtype, g)
    fake = {k: (torch.randn(d, generator=g, dtype=torch.float64) + 0.5).to(dtype) for k in params}
    try:
        with torch.no_grad():
            y = torch.func.functional_call(owner, fake, (x,))
    except Exception:  # whatever it computes, it is not a norm of one tensor
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape or not torch.isfinite(y).all():
        return None
    x64, f64 = x.double(), {k: v.double() for k, v in fake.items()}
    for e in eps:
        ref = F.layer_norm(x64, (d,), f64["weight"], f64.get("bias"), e)
        if float((y.double() - ref).abs().max()) <= _TOL * float(ref.abs().max()):
            ln = nn.LayerNorm((d,), eps=e, bias="bias" in params, dtype=dtype)
            ln.weight = params["weight"]
            if "bias" in params:
                ln.bias = params["bias"]
            return ln
    return None


def traced_numeric_norms(gm: fx.GraphModule, model: nn.Module) -> dict[str, nn.Module]:
    """In a graph traced by `torch.fx` (parameters named from the model's root), the modules
    written in primitive operations that compute a LayerNorm (`numeric_layernorm`): the
    operations of each, called once on one tensor, become one `call_module` node on its path,
    held by `gm` as an `nn.LayerNorm`; returns them by path."""
    groups = calls_by_module(gm, lambda n: n.op in ("call_function", "call_method"))
    found: dict[str, nn.Module] = {}
    for path, nodes in groups.items():
        ends = _single_call(nodes, path)
        if ends is None:
            continue
        ln = numeric_layernorm(model.get_submodule(path), nodes)
        if ln is None:
            continue
        x, out = ends
        if not install(gm, model, path, ln, [(out, x)]):
            continue
        for n in reversed(nodes):  # the rest of its operations, now read by nothing
            if n is not out and not n.users:
                gm.graph.erase_node(n)
        found[path] = ln
    if found:
        gm.graph.lint()
        gm.recompile()
    return found


def _single_call(nodes: list[fx.Node], path: str) -> tuple[fx.Node, fx.Node] | None:
    """`(input, output)` when `nodes` read one outside tensor (besides the module's own
    parameters) and only one of them is read outside."""
    inside = set(nodes)
    ins = {
        a
        for n in nodes
        for a in n.all_input_nodes
        if a not in inside and not (a.op == "get_attr" and str(a.target).startswith(path + "."))
    }
    outs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(ins) != 1 or len(outs) != 1:
        return None
    return next(iter(ins)), outs[0]
