"""Attention found from the computation: the pattern `softmax(Q Kᵀ) V`, whatever module wrote it.

An attention core is either `scaled_dot_product_attention(Q, K, V, ...)` or a `matmul` of
queries and transposed keys whose scores (scaled, masked) go through a softmax over keys
into a second `matmul` with the values. From there, each of `Q`, `K`, `V` is traced back to
the one `nn.Linear` that produces it, and the output forward to the `nn.Linear` that reads
it; nothing is matched by name.

What lies between a projection and the core (head reshapes, transposes, rotary embeddings,
a query scaling, the repetition of key-value heads) is measured, not assumed: the map from
the projection's output to the core's input is probed with basis vectors (it must be linear
and act token by token, which is checked on a random input). Per head and token it is a
`(head_dim, head_dim)` matrix `M_t` on the head's block of projection outputs. The scores
read `z_qᵀ M_tᵀ N_s z_k`, so `W_q ↦ Gᵀ W_q`, `W_k ↦ G⁻¹ W_k` is a symmetry exactly when `G`
commutes with every `P_ts = M_tᵀ N_s`: all of `GL(head_dim)` when they are multiples of the
identity, a scaling-rotation per rotated plane (plus `GL` on the unrotated part) under
rotary embeddings (`groups/_algebra.py::commutant_basis`). Under grouped-query attention the
query heads of one key-value group share one element.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..attention._factors import HeadPermFactor, KeyShiftFactor, attention_factors
from ..attention._layout import HeadLayout, Slot
from ..groups import Breaker, MatTerm
from ..groups._algebra import AlgebraFactor, Repeat, commutant_basis
from ._kernel import MeanKernel
from ._shifts import AbsorbedShiftFactor, IntoLinears

__all__ = ["attention_from_graph", "drop_key_compensation"]

aten = torch.ops.aten
_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_SOFTMAX = {torch.softmax, F.softmax, aten.softmax.int, aten._softmax.default}
_MATMUL = {torch.matmul, operator.matmul, aten.matmul.default, torch.bmm, aten.bmm.default}
_SKIP = {aten._assert_tensor_metadata.default}
#: single-input operations allowed between the scores and the softmax (scaling, masking, casts)
_SCORE_OPS = {
    torch.div,
    torch.mul,
    torch.add,
    operator.truediv,
    operator.mul,
    operator.add,
    aten.to.dtype,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
}
_PROB_OPS = {F.dropout, aten.dropout.default, aten.to.dtype, aten.clone.default}


@dataclass(frozen=True)
class _Core:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    gqa: bool = False  # SDPA with enable_gqa: K, V have fewer heads than Q
    added: tuple = ()  # what is added to the scores (masks, position biases)


@dataclass(frozen=True)
class _Proj:
    """A projection traced to a core input: its Linear, the feature offset of head 0, and the
    per-head, per-token maps `M` (`(heads, tokens, dh, dh)`) onto the core's head vectors."""

    lin: _Linear
    offset: int
    maps: Tensor
    source_head: Tensor  # (heads,) the projection's head block feeding each core head

    @property
    def name(self) -> str:
        return self.lin.name


def attention_from_graph(
    gm: fx.GraphModule, root: nn.Module, values: dict[fx.Node, Any]
) -> tuple[list, list[Breaker], set[str]]:
    """`(factors, breakers, projections)`: the attention factors of every core in `gm`, the
    breakers explaining what was left out, and the query, key and value projections whose
    output rescalings and permutations the factors contain (the caller drops those). `values`
    holds each node's value on the example inputs."""
    factors, breakers, covered = [], [], set()
    for core in _cores(gm):
        try:
            fs, names = _core_factors(core, gm, root, values)
        except _Skip as exc:
            breakers.append(Breaker(core.out.name, f"attention pattern not analyzed: {exc}"))
            continue
        factors += fs
        covered |= names
    return factors, breakers, covered


class _Skip(Exception):
    pass


# -- finding cores -------------------------------------------------------------------------
def _cores(gm: fx.GraphModule) -> list[_Core]:
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _SDPA:
            q, k, v = n.args[:3]
            mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
            gqa = bool(n.kwargs.get("enable_gqa", False))
            out.append(_Core(q, k, v, n, gqa, (mask,) if isinstance(mask, fx.Node) else ()))
        elif n.target in _SOFTMAX and _softmax_last(n):
            core = _manual_core(n)
            if core is not None:
                out.append(core)
    return out


def _softmax_last(n: fx.Node) -> bool:
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return dim == -1 or (isinstance(dim, int) and dim == _ndim(n.args[0]) - 1)


def _ndim(n: Any) -> int:
    val = n.meta.get("gaugenet_shape") if isinstance(n, fx.Node) else None
    return len(val) if val is not None else -99


def _manual_core(sm: fx.Node) -> _Core | None:
    # back from the softmax to the scores matmul
    s = sm.args[0]
    added = []
    while isinstance(s, fx.Node) and s.op == "call_function" and s.target in _SCORE_OPS:
        added += [a for a in s.args[1:] if isinstance(a, fx.Node)]
        s = s.args[0]
    if not (isinstance(s, fx.Node) and s.target in _MATMUL):
        return None
    q, kt = s.args[:2]
    k = _untranspose(kt)
    if k is None:
        return None
    # forward from the softmax to the values matmul
    p = sm
    while len(p.users) == 1:
        (u,) = p.users
        if u.target in _MATMUL and u.args[0] is p:
            return _Core(q, k, u.args[1], u, added=tuple(added))
        if u.op == "call_function" and u.target in _PROB_OPS:
            p = u
            continue
        return None
    return None


def _untranspose(kt: Any) -> fx.Node | None:
    """`K` from `Kᵀ` (a transpose of the last two dimensions)."""
    if not isinstance(kt, fx.Node):
        return None
    if kt.target in (torch.transpose, aten.transpose.int, "transpose"):
        dims = sorted(d % 4 if isinstance(d, int) else -9 for d in kt.args[1:3])
        if dims in ([2, 3],) or list(kt.args[1:3]) in ([-2, -1], [-1, -2]):
            return kt.args[0]
    return None


# -- probing the maps ------------------------------------------------------------------------
def _ancestors_to(target: fx.Node, stop: fx.Node) -> list[fx.Node]:
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


def _evaluate(nodes: list[fx.Node], root: nn.Module, values: dict, stop: fx.Node, z: Tensor):
    env: dict[fx.Node, Any] = {stop: z}

    def look(a: Any) -> Any:
        return fx.node.map_arg(a, lambda x: env[x] if x in env else values[x])

    last = None
    for n in nodes:
        if n.op == "call_function" and n.target in _SKIP:
            env[n] = None
            continue
        args, kwargs = look(n.args), look(n.kwargs)
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_module":
            env[n] = root.get_submodule(str(n.target))(*args, **kwargs)
        else:
            raise _Skip(f"{n.op} {n.name} between a projection and the attention")
        last = env[n]
    return last


def _probe(nodes, root, values, stop: fx.Node, target: fx.Node) -> Tensor:
    """Responses of `target` to each basis vector of `stop`'s last axis, set at every token:
    `(features, *target.shape)`. Checks linearity and locality on a random input."""
    z0 = values[stop]
    feats = z0.shape[-1]
    eye = torch.eye(feats, dtype=z0.dtype)
    basis = eye.reshape(feats, *([1] * (z0.ndim - 1)), feats).expand(feats, *z0.shape)

    def f(z: Tensor) -> Tensor:
        out = _evaluate(nodes, root, values, stop, z)
        if not isinstance(out, Tensor):
            raise _Skip("the path to the attention does not give one tensor")
        return out

    try:
        resp = torch.vmap(f)(basis.contiguous())
    except _Skip:
        raise
    except Exception:
        resp = torch.stack([f(b) for b in basis])
    g = torch.Generator().manual_seed(0)
    zr = torch.randn(z0.shape, generator=g, dtype=torch.float64).to(z0.dtype)
    got = f(zr)
    # predicted from token-local responses: the token axes are those of z before features
    pred = _combine(resp, zr)
    if pred is None or not torch.allclose(got, pred, rtol=1e-6, atol=1e-6 * got.abs().max()):
        raise _Skip("the map from the projection to the attention is not linear token by token")
    return resp


def _combine(resp: Tensor, z: Tensor) -> Tensor | None:
    """`Σ_f resp[f] · z[..., f]`, with `z`'s leading axes (batch, token; or both flattened)
    matched to the core's `(batch, heads, token, dh)` layout."""
    if resp.ndim != 5:
        return None
    b, t = resp.shape[1], resp.shape[3]
    if z.ndim == 2 and z.shape[0] == b * t:
        z = z.reshape(b, t, -1)
    if z.ndim != 3 or z.shape[:2] != (b, t):
        return None
    return torch.einsum("fbhtd,btf->bhtd", resp, z)


@dataclass(frozen=True)
class _Linear:
    """A linear map in the graph: an `nn.Linear` call (weight `(out, in)`) or an
    `addmm(bias, x, W)` / `mm(x, W)` on parameters (weight `(in, out)`, as GPT-2's Conv1D)."""

    node: fx.Node
    weight: str
    bias: str | None
    out_axis: int  # the weight axis over outputs

    @property
    def name(self) -> str:
        return self.weight.rpartition(".")[0]

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis


def _as_linear(n: fx.Node, root: nn.Module) -> _Linear | None:
    if n.op == "call_module":
        m = root.get_submodule(str(n.target))
        if not isinstance(m, nn.Linear):
            return None
        b = f"{n.target}.bias" if m.bias is not None else None
        return _Linear(n, f"{n.target}.weight", b, 0)
    if n.op == "call_function" and n.target in (aten.addmm.default, aten.mm.default):
        if n.kwargs:
            return None
        args = n.args if n.target is aten.addmm.default else (None, *n.args)
        bias, _, w = args
        wname = _param_name(w, root)
        bname = _param_name(bias, root) if bias is not None else None
        if wname is None or (bias is not None and bname is None):
            return None
        return _Linear(n, wname, bname, 1)
    return None


def _param_name(n: Any, root: nn.Module) -> str | None:
    is_param = isinstance(n, fx.Node) and n.op == "get_attr"
    if is_param and isinstance(_param_or_none(root, str(n.target)), nn.Parameter):
        return str(n.target)
    return None


def _linear_source(node: fx.Node, root: nn.Module) -> _Linear:
    """The one linear map whose output reaches `node` without passing another module or
    parameter."""
    found, stack, seen = {}, [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        lin = _as_linear(n, root)
        if lin is not None:
            found[n] = lin
            continue
        if n.op == "call_module":
            m = root.get_submodule(str(n.target))
            raise _Skip(f"{type(m).__name__} {n.target} between a projection and the core")
        if _param_name(n, root) is not None:
            raise _Skip(f"parameter {n.target} enters between a projection and the core")
        stack += list(n.all_input_nodes)
    if len(found) != 1:
        raise _Skip(f"{len(found)} projections feed one attention input")
    return next(iter(found.values()))


def _param_or_none(root: nn.Module, path: str) -> Any:
    try:
        return root.get_parameter(path)
    except (AttributeError, TypeError):
        return None


def _trace_input(node: fx.Node, root, values) -> _Proj:
    lin = _linear_source(node, root)
    nodes = _ancestors_to(node, lin.node)
    resp = _probe(nodes, root, values, lin.node, node)  # (F, B, H, T, dh)
    feats = resp.shape[0]
    B, H, T, dh = resp.shape[1:]
    r = resp[:, 0]  # (F, H, T, dh)
    if not torch.allclose(resp, r.unsqueeze(1).expand_as(resp)):
        raise _Skip("the projection's map to the heads depends on the batch entry")
    used = r.abs().amax(dim=(2, 3)) > 0  # (F, H)
    starts = []
    for h in range(H):
        idx = used[:, h].nonzero().flatten()
        if len(idx) != dh or int(idx[-1] - idx[0]) != dh - 1:
            raise _Skip("a head does not read one contiguous block of the projection")
        starts.append(int(idx[0]))
    st = torch.tensor(starts)
    if any(s % dh for s in starts):
        raise _Skip("head blocks are not aligned to the head size")
    blocks = st // dh
    offset = int(blocks.min()) * dh
    maps = torch.stack(
        [r[starts[h] : starts[h] + dh, h].permute(1, 2, 0) for h in range(H)]
    )  # (H, T, dh_out, dh_in)
    del feats
    return _Proj(lin, offset, maps, blocks - int(blocks.min()))


def _trace_output(core: fx.Node, root, values) -> tuple[_Linear, int]:
    """The linear map reading the core's output (through reshapes only), and its input
    offset; the core's head `h`, entry `j` must land on input `offset + h·dv + j`."""
    chain = [core]
    n = core
    while True:
        users = [u for u in n.users if u.target not in _SKIP]
        if len(users) != 1:
            raise _Skip("the attention output has several readers")
        (u,) = users
        lin = _as_linear(u, root)
        if lin is not None:
            if (u.args[0] if u.op == "call_module" else u.args[-2]) is not n:
                raise _Skip("the attention output is not the input of its projection")
            break
        if u.op == "call_module":
            m = root.get_submodule(str(u.target))
            raise _Skip(f"the attention output goes into {type(m).__name__}")
        chain.append(u)
        n = u
    out = values[core]
    if out.ndim != 4:
        raise _Skip("attention output is not (batch, heads, tokens, dim)")
    B, H, T, dv = out.shape
    nodes = chain[1:]
    eye = torch.eye(H * dv, dtype=out.dtype).reshape(H * dv, 1, H, 1, dv)
    basis = eye.expand(H * dv, B, H, T, dv).contiguous()

    def f(o: Tensor) -> Tensor:
        return _evaluate(nodes, root, values, core, o) if nodes else o

    try:
        resp = torch.vmap(f)(basis)
    except Exception:
        resp = torch.stack([f(b) for b in basis])
    if resp.ndim == 3 and resp.shape[1] == B * T:
        resp = resp.reshape(resp.shape[0], B, T, -1)
    if resp.ndim != 4 or resp.shape[1:3] != (B, T):
        raise _Skip("the attention output is not read token by token")
    sel = resp[:, 0, 0]  # (H·dv, F)
    hot = sel.abs() > 0
    if not bool((hot.sum(1) == 1).all()) or not torch.equal(sel[hot], torch.ones_like(sel[hot])):
        raise _Skip("the attention output is not a plain reshape into its projection")
    cols = hot.float().argmax(1)
    offset = int(cols[0])
    if not torch.equal(cols, offset + torch.arange(H * dv)):
        raise _Skip("the output projection reads the heads out of order")
    return lin, offset


# -- factors ---------------------------------------------------------------------------------
def _scalar_maps(maps: Tensor) -> bool:
    """Every `M` a multiple of the identity (same multiple for each token's head)."""
    d = maps.shape[-1]
    c = maps[..., 0, 0]
    return torch.allclose(maps, c[..., None, None] * torch.eye(d, dtype=maps.dtype))


def _core_factors(core: _Core, gm, root: nn.Module, values: dict) -> list:
    qv = values[core.q]
    if not isinstance(qv, Tensor) or qv.ndim != 4:
        raise _Skip("queries are not (batch, heads, tokens, dim)")
    pq = _trace_input(core.q, root, values)
    pk = _trace_input(core.k, root, values)
    pv = _trace_input(core.v, root, values)
    po, o_off = _trace_output(core.out, root, values)
    H, T, dh = pq.maps.shape[0], pq.maps.shape[1], pq.maps.shape[-1]
    dv = pv.maps.shape[-1]
    if not torch.equal(pq.source_head, torch.arange(H)):
        raise _Skip("query heads are not the projection's blocks in order")
    # key-value group of every query head
    if core.gqa:
        hk = pk.maps.shape[0]
        if H % hk:
            raise _Skip("query heads are not a multiple of key-value heads")
        kv_of = pk.source_head.repeat_interleave(H // hk)
        k_maps = pk.maps.repeat_interleave(H // hk, 0)
        v_src = pv.source_head.repeat_interleave(H // hk)
        v_maps = pv.maps.repeat_interleave(H // hk, 0)
    else:
        kv_of, k_maps, v_src, v_maps = pk.source_head, pk.maps, pv.source_head, pv.maps
    if not torch.equal(v_src, kv_of):
        raise _Skip("values and keys are grouped differently")
    hkv = int(kv_of.max()) + 1
    rep = H // hkv
    if not torch.equal(kv_of, torch.arange(hkv).repeat_interleave(rep)):
        raise _Skip("query heads are not grouped by consecutive key-value heads")
    if not _scalar_maps(v_maps):
        raise _Skip("values are transformed (rotated) before the attention")
    names = [pq.name, pk.name, pv.name, po.name]
    prefix = _common_prefix(names)
    modules = tuple(dict.fromkeys(names))
    covered = {pq.name, pk.name, pv.name}
    # the score matrices P_ts = M_tᵀ N_s, per head
    P = torch.einsum("htij,hsik->htsjk", pq.maps.double(), k_maps.double())
    P = P.reshape(H * T * T, dh, dh)
    basis = commutant_basis(P)
    axes = {p.lin.out_axis for p in (pq, pk, pv)} | {po.in_axis ^ 1}
    if basis is None and hkv == H and len(axes) == 1:

        def slot(p: _Proj) -> Slot:
            return Slot(p.lin.weight, p.offset, p.lin.bias, p.offset)

        lay = HeadLayout(
            prefix,
            H,
            dh,
            dv,
            slot(pq),
            slot(pk),
            slot(pv),
            Slot(po.weight, o_off, po.bias),
            "torch" if axes == {0} else "paper",
        )
        shapes = {n: tuple(p.shape) for n, p in root.named_parameters()}
        fs = attention_factors(lay, shapes, softmax=True, homogeneous=False, modules=modules)
        if _per_head_scores(core, values, H):
            # a position bias that differs between heads: permuting heads would need it too
            fs = [f for f in fs if not isinstance(f, HeadPermFactor)]
        return fs, covered
    name = prefix or pq.name

    def terms(p: _Proj, mode: str, times: int = 1) -> list:
        out = [MatTerm(p.lin.weight, p.lin.out_axis, p.offset, mode)]
        if p.lin.bias is not None:
            out.append(MatTerm(p.lin.bias, 0, p.offset, mode))
        return [Repeat(t, times) if times > 1 else t for t in out]

    # query-key: per key-value group, in the commutant of the score maps
    qk_terms = terms(pq, "T", rep) + terms(pk, "inv")
    qk = AlgebraFactor(f"{name}.qk", dh, hkv, basis=basis, terms=tuple(qk_terms), modules=modules)
    o_term = MatTerm(po.weight, po.in_axis, o_off, "inv")
    vo_terms = [*terms(pv, "T"), Repeat(o_term, rep) if rep > 1 else o_term]
    vo = AlgebraFactor(f"{name}.vo", dv, hkv, terms=tuple(vo_terms), modules=modules)
    return [qk, vo], covered


def _per_head_scores(core: _Core, values: dict, heads: int) -> bool:
    """Something added to the scores differs between heads (a relative position bias, ALiBi)."""
    for a in core.added:
        v = values.get(a)
        # scores are (batch, heads, queries, keys): the heads axis is the third from the end
        per_head = isinstance(v, Tensor) and v.ndim >= 3 and v.shape[-3] == heads > 1
        if per_head and not bool((v == v.narrow(-3, 0, 1)).all()):
            return True
    return False


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        out.append(seg[0])
    return ".".join(out)


def drop_key_compensation(factors: list) -> list:
    """Shifts of a LayerNorm's `β` need not be taken back by the key projections of a
    softmax attention: a constant added to every key moves each query's scores by one
    number, which softmax removes (the `key_shift` factor). Leaving the key biases out keeps
    the shift commuting with the query-key `GL`, which does not move the key bias. The same
    holds for the constant a LayerNorm kernel adds to the keys."""
    keys = {f.terms[0].param for f in factors if isinstance(f, KeyShiftFactor)}
    if not keys:
        return factors
    out = []
    for f in factors:
        terms = getattr(f, "terms", ())
        if isinstance(f, AbsorbedShiftFactor) and any(isinstance(t, IntoLinears) for t in terms):
            new = []
            for t in terms:
                if isinstance(t, IntoLinears):
                    kept = tuple(c for c in t.consumers if c[1] not in keys)
                    t = dataclasses.replace(t, consumers=kept)
                new.append(t)
            f = dataclasses.replace(f, terms=tuple(new))
        kern = getattr(f, "kernel", None)
        if isinstance(kern, MeanKernel) and any(sl.bias in keys for sl in kern.slots):
            slots = tuple(
                dataclasses.replace(sl, bias=None) if sl.bias in keys else sl for sl in kern.slots
            )
            f = dataclasses.replace(f, terms=(dataclasses.replace(kern, slots=slots),))
        out.append(f)
    return out
