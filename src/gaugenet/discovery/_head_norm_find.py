"""Finding the kernel of a query or key normalization in its projection's rows (the factor
is in `_head_norm_kernel.py`), from the graph and measured on the example inputs.

From a gain that feeds an attention core (`_attention_gain.py`), the node it multiplies is
traced back to the one linear map producing it (as the attention's projections are). The
map `f` from that projection's output `y` to the gain's output is then measured:

1. its derivative along each output row `i` of the projection, with a random coefficient
   per token (`y ↦ y + ε c ⊗ e_i`, forward-mode), gives the entries of `f(y)` that
   row reaches; rows that reach overlapping entries form one block (a head's rows, for a
   per-head normalization);
2. per block, the common kernel of those derivatives (one vector `u` over the block's rows,
   for every token at once) must be one-dimensional: a LayerNorm's `1`; an RMSNorm has none;
3. exactness: `y ↦ y + Σ_k c_k ⊗ u_k`, with random coefficients of the size of `y` per
   token and block, must leave the gain's output, and every other result computed from the
   projection's output on the way (the rows of a fused projection that go elsewhere),
   unchanged to the tolerance of the model's precision.

The projection's input, when it is a LayerNorm's output (through casts, identities and
eval-mode dropouts), names the coordinates the factor uses (see `_head_norm_kernel.py`).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, fx, nn

from ._attention_gain import Gain
from ._attention_trace import Skip, ancestors_to, evaluate, linear_source
from ._float64 import keep_float64
from ._head_norm_kernel import HeadNormKernel, HeadNormKernelFactor
from ._kernel import ill_conditioned
from ._linear import Linear
from ._offset_layernorm import effective_gain, gain_offset
from ._ops import graph_users, is_cast, passes_input

__all__ = ["head_norm_kernel", "measure_blocks"]

#: relative tolerance of the exactness check, by the projection output's precision
_EXACT = {torch.float64: 1e-9, torch.float32: 1e-4}
#: relative size below which a derivative or a singular value counts as zero, by precision
_ZERO = {torch.float64: 1e-9, torch.float32: 1e-5}


def head_norm_kernel(
    name: str, gain: Gain, root: nn.Module, values: dict
) -> HeadNormKernelFactor | None:
    """The kernel factor of the normalization before `gain` in its projection's rows, or
    `None` when there is none (no single projection, no block with a one-dimensional
    kernel, or the exactness check fails)."""
    if not isinstance(gain.source, fx.Node):
        return None
    try:
        lin = linear_source(gain.source, root, values)
    except Skip:
        return None
    if isinstance(lin, Gain) or not isinstance(values.get(lin.node), Tensor):
        return None
    nodes = ancestors_to(gain.node, lin.node)
    blocks = measure_blocks(nodes, root, values, lin.node, gain.node)
    if not blocks:
        return None
    rows = torch.stack([r for r, _ in blocks])
    u = torch.stack([v for _, v in blocks])
    features = lin.shape(root)[1]
    ln = _layernorm_read(lin, root, features)
    m = root.get_submodule(ln) if ln is not None else None
    term = HeadNormKernel(
        lin.weight,
        lin.bias,
        lin.out_axis,
        rows,
        u,
        features,
        ln,
        getattr(m, "weight", None) is not None,
        getattr(m, "bias", None) is not None,
        gain_offset(m) if m is not None else 0.0,
        offset=lin.bias is None and _offset_coordinates(m),
    )
    mods = tuple(dict.fromkeys([lin.name, *([ln] if ln else [])]))
    return HeadNormKernelFactor(name, sum(term.sizes()), terms=(term,), modules=mods)


def measure_blocks(
    nodes: list[fx.Node], root: nn.Module, values: dict, stop: fx.Node, target: fx.Node
) -> list[tuple[Tensor, Tensor]]:
    """`(rows, u)` per block of `stop`'s output rows (last axis) on whose common kernel
    `target` does not depend (module docstring); `[]` when there is none or the exactness
    check fails. `nodes`: the nodes from `stop` to `target`, in graph order."""
    y0 = values[stop]
    if not isinstance(y0, Tensor) or not y0.is_floating_point() or y0.dtype not in _EXACT:
        return []
    with torch.no_grad(), keep_float64() if y0.dtype == torch.float64 else nullcontext():
        try:
            return _measure(nodes, root, values, stop, target, y0.detach())
        except Skip:
            return []
        except (RuntimeError, TypeError, ValueError, IndexError):
            return []


def _measure(nodes, root, values, stop, target, y0: Tensor) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(*y0.shape[:-1], 1, generator=gen, dtype=torch.float64)
    D = None
    if y0.dtype != torch.float64:  # in float64 where the path runs so: `u` to float64's ε
        try:
            with keep_float64():
                wide = _Wide(root, nodes)
                D = _derivatives(nodes, wide, _WideValues(values), stop, y0.double(), c)
        except (Skip, RuntimeError, TypeError, ValueError, IndexError):
            D = None
    exact = D is not None or y0.dtype == torch.float64
    if D is None:
        D = _derivatives(nodes, root, values, stop, y0, c.to(y0.dtype))
    top = float(D.abs().max())
    if top == 0:
        return []
    zero = _ZERO[torch.float64 if exact else y0.dtype]
    reach = D.abs() > zero * top  # (F, N)
    blocks = []
    for R in _components(reach):
        _, s, vh = torch.linalg.svd(D[R].T.double(), full_matrices=False)
        null = s <= zero * float(s[0])
        if int(null.sum()) != 1 or len(R) < 2:
            continue
        u = vh[-1]
        u = u / u[u.abs().argmax()]
        blocks.append((R, u if exact else u.to(y0.dtype)))
    if not blocks or not _exact(nodes, root, values, stop, target, y0, blocks, gen):
        return []
    return blocks


def _derivatives(nodes, root, values, stop, y0: Tensor, c: Tensor) -> Tensor:
    """`(F, N)`: the derivative of the map from `stop`'s output to the last node's, flattened,
    along each output row `i` (`c ⊗ e_i`, `c` `(*tokens, 1)` one coefficient per token)."""

    def f(z: Tensor) -> Tensor:
        out = evaluate(nodes, root, values, stop, z, keep64=True)
        if not isinstance(out, Tensor):
            raise Skip("the normalization does not give one tensor")
        return out.reshape(-1)

    eye = torch.eye(int(y0.shape[-1]), dtype=y0.dtype)
    return torch.stack([torch.func.jvp(f, (y0,), (c * e,))[1] for e in eye]).detach()


class _Wide:
    """`root` as `evaluate` reads it on `nodes`: each submodule they call, a float64 copy
    (made here: not under a `torch.func` transform)."""

    def __init__(self, root: nn.Module, nodes: list[fx.Node]) -> None:
        names = {str(n.target) for n in nodes if n.op == "call_module"}
        self._copies = {m: copy.deepcopy(root.get_submodule(m)).double() for m in names}

    def get_submodule(self, name: str) -> nn.Module:
        return self._copies[name]


class _WideValues:
    """The recorded values, floating tensors read in float64."""

    def __init__(self, values: dict) -> None:
        self._values = values

    def __getitem__(self, node: fx.Node) -> Any:
        v = self._values[node]
        return v.double() if isinstance(v, Tensor) and v.is_floating_point() else v

    def __contains__(self, node: object) -> bool:
        return node in self._values


def _components(reach: Tensor) -> list[Tensor]:
    """Rows (of `reach`, `(F, N)` bool) that reach some entry, grouped: two rows share a
    group when they reach a common entry (transitively). Ascending, groups by first row."""
    used = reach.any(1).nonzero().reshape(-1).tolist()
    overlap = (reach.double() @ reach.double().T) > 0
    group: dict[int, int] = {}
    for i in used:
        if i in group:
            continue
        stack, group[i] = [i], i
        while stack:
            j = stack.pop()
            for k in overlap[j].nonzero().reshape(-1).tolist():
                if k not in group:
                    group[k] = i
                    stack.append(k)
    firsts = sorted(set(group.values()))
    return [torch.tensor(sorted(k for k, g in group.items() if g == r)) for r in firsts]


def _exact(nodes, root, values, stop, target, y0, blocks, gen) -> bool:
    """A finite move along every block's kernel, per token and block, changes neither
    `target` nor any other result computed from `stop` on the way."""
    scale = float(y0.abs().max()) or 1.0
    y1 = y0.clone()
    for R, u in blocks:
        c = torch.randn(*y0.shape[:-1], 1, generator=gen, dtype=torch.float64).to(y0.dtype)
        y1[..., R] = y1[..., R] + (scale * c * u).to(y0.dtype)
    inside = set(nodes) | {stop}
    frontier = [
        w for n in [stop, *nodes] if n is not target for w in graph_users(n) if w not in inside
    ]
    order = [n for n in stop.graph.nodes if n in set(nodes) or n in set(frontier)]
    before: dict[fx.Node, Any] = {}
    after: dict[fx.Node, Any] = {}
    evaluate(order, root, values, stop, y0, before, keep64=True)
    evaluate(order, root, values, stop, y1, after, keep64=True)
    tol = _EXACT[y0.dtype]
    outs = [(before[w], after[w]) for w in dict.fromkeys([target, *frontier])]
    for b, a in outs:
        if isinstance(b, Tensor) and b.is_floating_point():
            ref = float(b.abs().max()) or 1.0
            if not isinstance(a, Tensor) or float((a - b).abs().max()) > tol * ref:
                return False
        elif isinstance(b, Tensor) and not (isinstance(a, Tensor) and torch.equal(a, b)):
            return False
    return True


def _offset_coordinates(ln: nn.Module | None) -> bool:
    """The LayerNorm has a `β'` with `1ᵀ (β'/γ')` not negligible (`|Σ β̃| > 1e-6 Σ |β̃|`):
    its offset group may turn a bias-free reader, and the kernel is written to commute with
    it (`_head_norm_kernel.py`)."""
    if ln is None or getattr(ln, "bias", None) is None:
        return False
    gamma = effective_gain(ln)
    bt = ln.bias.detach() / gamma if gamma is not None else ln.bias.detach()
    return float(bt.sum().abs()) > 1e-6 * float(bt.abs().sum())


def _layernorm_read(lin: Linear, root: nn.Module, features: int) -> str | None:
    """The `nn.LayerNorm` (over `features`, well-conditioned gain) whose output the
    projection reads, through casts, identities and eval-mode dropouts; else `None`."""
    x = lin.input_node()
    while isinstance(x, fx.Node) and (is_cast(x) or passes_input(x, root)) and x.args:
        x = x.args[0]
    if not (isinstance(x, fx.Node) and x.op == "call_module"):
        return None
    m = root.get_submodule(str(x.target))
    if not isinstance(m, nn.LayerNorm) or tuple(m.normalized_shape) != (features,):
        return None
    if ill_conditioned(effective_gain(m)) is not None:
        return None
    return str(x.target)
