"""Tracing an attention core's inputs and output to their linear maps, and measuring the maps
in between (see `_attention.py`).

From a core input the graph is walked back to the one linear map producing it (`nn.Linear`,
or `addmm`/`mm` on parameters, as GPT-2's Conv1D); the nodes in between are evaluated on
basis vectors (vmapped) with every other input at its recorded value, and the result must
be linear and token by token (checked on a random input). Each head reads `head_dim` rows of
the projection: one block, blocks evenly spaced (other projections packed between), or rows
listed one by one (a fused projection split into partitions). The core's output must reach
the projection reading it as a plain reshape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from ._attention_folded import fold_batch
from ._attention_gain import Gain, as_gain
from ._linear import Linear, as_linear, param_name
from ._ops import DTYPE_CASTS, METADATA_OPS, graph_users, is_cast

__all__ = [
    "Linear",
    "Proj",
    "Skip",
    "ancestors_to",
    "evaluate",
    "linear_source",
    "linear_sources",
    "trace_input",
    "trace_output",
]

aten = torch.ops.aten


class Skip(Exception):
    """The pattern is not one the analysis covers (the message says why)."""


def ancestors_to(target: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """Nodes on paths from `stop` to `target` (excluding `stop`), in graph order."""
    down: set[fx.Node] = set()
    stack = [target]
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack += [a for a in n.all_input_nodes]
    # nodes that depend on `stop`
    dep = {stop}
    for n in stop.graph.nodes:
        if n is not stop and n in seen and any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    down = dep - {stop}
    return [n for n in stop.graph.nodes if n in down]


def evaluate(
    nodes: list[fx.Node],
    root: nn.Module,
    values: dict,
    stop: fx.Node,
    z: Tensor,
    env: dict[fx.Node, Any] | None = None,
    keep64: bool = False,
):
    """`nodes` (in graph order) run with `stop`'s value replaced by `z`, every other input at
    its recorded value; the last result. `env`, when given, receives every node's result.
    `keep64`: casts and copies of a float64 value pass it on unchanged (no float32 inside)."""
    env = {} if env is None else env
    env[stop] = z
    if not nodes:  # the projection feeds the core directly
        return z

    def look(a: Any) -> Any:
        return fx.node.map_arg(a, lambda x: env[x] if x in env else values[x])

    last = None
    for n in nodes:
        if n.op == "call_function" and n.target in METADATA_OPS:
            env[n] = None
            continue
        args, kwargs = look(n.args), look(n.kwargs)
        if keep64 and is_cast(n) and args and _is64(args[0]):
            env[n] = last = args[0]
            continue
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_module":
            env[n] = root.get_submodule(str(n.target))(*args, **kwargs)
        else:
            raise Skip(f"{n.op} {n.name} between a projection and the attention")
        last = env[n]
    return last


def _is64(x: Any) -> bool:
    return isinstance(x, Tensor) and x.dtype == torch.float64


def _probe(
    nodes,
    root,
    values,
    stop: fx.Node,
    target: fx.Node,
    batch: int = 0,
    axes: int = 1,
    head_first: bool = False,
) -> Tensor:
    """Responses of `target` to each basis vector of `stop`'s last `axes` axes (flattened),
    set at every token: `(features, *target.shape)`, with `target`'s leading axis unfolded
    into `(batch, -1)` when `batch` is given (heads folded into the batch). `head_first`:
    `stop` is `(batch, heads, tokens, dh)`, probed as its `(batch, tokens, heads, dh)` view.
    Checks linearity and locality on a random input."""
    z0 = values[stop].transpose(1, 2) if head_first else values[stop]
    trail = tuple(z0.shape[z0.ndim - axes :])
    feats = math.prod(trail)
    eye = torch.eye(feats, dtype=z0.dtype).reshape(feats, *trail)
    basis = eye.reshape(feats, *([1] * (z0.ndim - axes)), *trail).expand(feats, *z0.shape)

    def f(z: Tensor) -> Tensor:
        out = evaluate(nodes, root, values, stop, z.transpose(1, 2) if head_first else z)
        if not isinstance(out, Tensor):
            raise Skip("the path to the attention does not give one tensor")
        return out.unflatten(0, (batch, -1)) if batch else out

    try:
        resp = torch.vmap(f)(basis.contiguous())
    except Skip:
        raise
    except Exception:
        resp = torch.stack([f(b) for b in basis])
    g = torch.Generator().manual_seed(0)
    zr = torch.randn(z0.shape, generator=g, dtype=torch.float64).to(z0.dtype)
    got = f(zr)
    # predicted from token-local responses: the token axes are those of z before features
    pred = _combine(resp, zr.flatten(-axes) if axes > 1 else zr)
    if pred is None or not torch.allclose(got, pred, rtol=1e-6, atol=1e-6 * got.abs().max()):
        raise Skip("the map from the projection to the attention is not linear token by token")
    return resp


def _combine(resp: Tensor, z: Tensor) -> Tensor | None:
    """`Σ_f resp[f] · z[..., f]`, with `z`'s leading axes (batch, token; or both flattened)
    matched to the core's `(batch, heads, token, dh)` layout."""
    if resp.ndim != 5:
        return None
    b, t = resp.shape[1], resp.shape[3]
    if z.ndim == 2 and z.shape[0] == b * t:
        z = z.reshape(b, t, -1)
    if z.ndim > 3 and [s for s in z.shape[:-1] if s != 1] == [b, t]:
        z = z.reshape(b, t, -1)  # axes of one entry beside them (DeepSeek's `(b, 1, t, f)`)
    if z.ndim != 3 or z.shape[:2] != (b, t):
        return None
    return torch.einsum("fbhtd,btf->bhtd", resp, z.to(resp.dtype))


@dataclass(frozen=True)
class Proj:
    """A projection traced to a core input: its Linear, the feature offset of head 0, and the
    per-head, per-token maps `M` (`(heads, tokens, dh, dh)`) onto the core's head vectors,
    their input columns being the projection rows `rows[h]` (`(heads, dh)`, ascending)."""

    lin: Linear
    offset: int
    maps: Tensor
    source_head: Tensor  # (heads,) the projection's head block feeding each core head
    #: head blocks `stride` blocks apart (other projections packed between); 0: the heads'
    #: rows are not evenly spaced blocks (only `rows` describes them)
    stride: int = 1
    rows: Tensor | None = None  # (heads, dh) the projection rows each core head reads

    @property
    def name(self) -> str:
        return self.lin.name

    @property
    def regular(self) -> bool:
        """Every source head is one block of rows at `offset + k·stride·dh`."""
        return self.stride > 0

    def block_rows(self) -> Tensor:
        """`(blocks, dh)`: the rows of each source head, in `source_head` order."""
        dh = self.maps.shape[-1]
        if self.rows is None:
            starts = self.offset + torch.arange(int(self.source_head.max()) + 1) * self.stride * dh
            return starts[:, None] + torch.arange(dh)[None, :]
        first = [int((self.source_head == k).nonzero()[0]) for k in range(self.blocks)]
        return self.rows[first]

    @property
    def blocks(self) -> int:
        return int(self.source_head.max()) + 1


def _sizes(v: Any) -> bool:
    """`v` is a size, a number of elements or a tuple of them, not a tensor."""
    if isinstance(v, (torch.Size, int)) and not isinstance(v, bool):
        return True
    return isinstance(v, tuple) and all(isinstance(e, int) for e in v)


def linear_source(node: fx.Node, root: nn.Module, values: dict) -> Linear:
    """The one linear map whose output reaches `node` without passing another module or
    parameter: a projection, or a gain (`_attention_gain.py`)."""
    found = linear_sources(node, root, values)
    if len(found) != 1:
        raise Skip(f"{len(found)} projections feed one attention input")
    return found[0]


def linear_sources(node: fx.Node, root: nn.Module, values: dict) -> list[Linear]:
    """The linear maps (projections or gains) whose outputs reach `node` without passing
    another module or parameter, in the order found; `Skip` when a module or a parameter
    enters on the way."""
    found, stack, seen = {}, [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        lin = as_linear(n, root)
        if lin is None and n.op in ("call_function", "call_module"):
            lin = as_gain(n, root, values)
        if lin is not None:
            found[n] = lin
            continue
        if n.op == "call_module":
            m = root.get_submodule(str(n.target))
            raise Skip(f"{type(m).__name__} {n.target} between a projection and the core")
        if param_name(n, root) is not None:
            raise Skip(f"parameter {n.target} enters between a projection and the core")
        if n.op == "call_function" and n.target in DTYPE_CASTS:  # `x.type_as(y)`: y's dtype
            stack.append(n.args[0])
            continue
        # sizes read for a reshape (`B, T, _ = y.shape`) carry no values
        stack += [a for a in n.all_input_nodes if not _sizes(values.get(a))]
    return list(found.values())


def _probe_gain(nodes, root, values, gain: Gain, node: fx.Node, batch: int) -> tuple[Gain, Tensor]:
    """`_probe` from a gain: its features after batch and tokens, or, for a gain of one axis
    on a `(batch, heads, tokens, dh)` tensor shaped as the core's input (a norm after the
    heads are moved forward, as Gemma 3's), its heads and `dh`. The first layout whose map
    is linear token by token is taken (heads first tried first where the shapes allow)."""
    v, core = values[gain.node], values[node]
    gamma = root.get_parameter(gain.weight)
    heads_first = v.ndim == 4 and gamma.ndim == 1 and v.shape == core.shape and not batch
    for first in (True, False) if heads_first else (False,):
        try:
            resp = _probe(nodes, root, values, gain.node, node, batch, gain.feature_axes, first)
        except Skip:
            if first:
                continue
            raise
        return dataclasses.replace(gain, head_first=first), resp
    raise Skip("no layout of the gain's features maps to the heads")


def trace_input(node: fx.Node, root: nn.Module, values: dict, folded: bool = False) -> Proj:
    """The projection producing the core input `node`, with its per-head maps. `folded`:
    `node` is `(batch·heads, tokens, dh)`, batch major (`_attention_folded.py`)."""
    lin = linear_source(node, root, values)
    nodes = ancestors_to(node, lin.node)
    batch = fold_batch(values[lin.node], values[node]) if folded else 0
    if folded and not batch:
        raise Skip("the heads folded into the batch do not match the projection's batch")
    if isinstance(lin, Gain):
        lin, resp = _probe_gain(nodes, root, values, lin, node, batch)
    else:
        resp = _probe(nodes, root, values, lin.node, node, batch)  # (F, B, H, T, dh)
    B, H, T, dh = resp.shape[1:]
    r = resp[:, 0]  # (F, H, T, dh)
    if B > 1 and not torch.allclose(resp[:, -1], r):
        raise Skip("the projection's map to the heads depends on the batch entry")
    used = r.abs().amax(dim=(2, 3)) > 0  # (F, H)
    rows = []
    for h in range(H):
        idx = used[:, h].nonzero().flatten()
        if len(idx) != dh:
            raise Skip("a head does not read as many projection rows as its size")
        rows.append(idx)
    rows_t = torch.stack(rows)  # (H, dh), ascending
    maps = torch.stack(
        [r[rows_t[h], h].permute(1, 2, 0) for h in range(H)]
    )  # (H, T, dh_out, dh_in)
    return _layout(lin, maps, rows_t)


def _layout(lin: Linear, maps: Tensor, rows: Tensor) -> Proj:
    """The `Proj` of heads reading `rows` (`(H, dh)`): the source head of each core head
    (heads reading the same rows share one, as repeated key-value heads), numbered in the
    order of their first rows, and whether they are evenly spaced blocks (`offset`,
    `stride`) or only described by `rows` (`stride = 0`)."""
    H, dh = rows.shape
    firsts, source = torch.unique(rows[:, 0], return_inverse=True)
    for h in range(H):
        k = int(source[h])
        if not torch.equal(rows[h], rows[int((source == k).nonzero()[0])]):
            raise Skip("two heads read overlapping but different projection rows")
    blocks = rows[(source[:, None] == torch.arange(len(firsts))[None, :]).float().argmax(0)]
    if len(set(blocks.reshape(-1).tolist())) != blocks.numel():
        raise Skip("two heads read overlapping but different projection rows")
    offset = int(firsts[0])
    contiguous = bool((rows == rows[:, :1] + torch.arange(dh)[None, :]).all())
    starts = firsts - offset
    stride = int(starts[1]) // dh if len(starts) > 1 else 1
    even = contiguous and offset % dh == 0 and stride > 0
    even = even and torch.equal(starts, torch.arange(len(starts)) * stride * dh)
    return Proj(lin, offset, maps, source, stride if even else 0, rows)


def trace_output(
    core: fx.Node, root: nn.Module, values: dict, heads: int = 0
) -> tuple[Linear, int]:
    """The linear map reading the core's output (through reshapes only), and its input
    offset; the core's head `h`, entry `j` must land on input `offset + h·dv + j`. `heads`:
    the core's output is `(batch·heads, tokens, dv)`, batch major, with that many heads."""
    chain = [core]
    n = core
    while True:
        users = graph_users(n)
        if len(users) != 1:
            raise Skip("the attention output has several readers")
        (u,) = users
        lin = as_linear(u, root)
        if lin is not None:
            if (u.args[0] if u.op == "call_module" else u.args[-2]) is not n:
                raise Skip("the attention output is not the input of its projection")
            break
        if u.op == "call_module":
            m = root.get_submodule(str(u.target))
            raise Skip(f"the attention output goes into {type(m).__name__}")
        chain.append(u)
        n = u
    out = values[core]
    if heads and out.ndim == 3 and out.shape[0] % heads == 0:
        out = out.unflatten(0, (-1, heads))
    if out.ndim != 4:
        raise Skip("attention output is not (batch, heads, tokens, dim)")
    B, H, T, dv = out.shape
    nodes = chain[1:]
    eye = torch.eye(H * dv, dtype=out.dtype).reshape(H * dv, 1, H, 1, dv)
    basis = eye.expand(H * dv, B, H, T, dv).contiguous()
    if heads:  # as the core gives it: `(batch·heads, tokens, dv)`
        basis = basis.flatten(1, 2)

    def f(o: Tensor) -> Tensor:
        return evaluate(nodes, root, values, core, o) if nodes else o

    try:
        resp = torch.vmap(f)(basis)
    except Exception:
        resp = torch.stack([f(b) for b in basis])
    if resp.ndim == 3 and resp.shape[1] == B * T:
        resp = resp.reshape(resp.shape[0], B, T, -1)
    if resp.ndim != 4 or resp.shape[1:3] != (B, T):
        raise Skip("the attention output is not read token by token")
    sel = resp[:, 0, 0]  # (H·dv, F)
    hot = sel.abs() > 0
    if not bool((hot.sum(1) == 1).all()) or not torch.equal(sel[hot], torch.ones_like(sel[hot])):
        raise Skip("the attention output is not a plain reshape into its projection")
    cols = hot.float().argmax(1)
    offset = int(cols[0])
    if not torch.equal(cols, offset + torch.arange(H * dv)):
        raise Skip("the output projection reads the heads out of order")
    return lin, offset
