"""Attention found from the computation: the pattern `softmax(Q Kᵀ) V`, whatever module wrote it.

An attention core is either `scaled_dot_product_attention(Q, K, V, ...)` or a `matmul` of
queries and transposed keys whose scores (scaled, masked) go through a softmax over keys
into a second `matmul` with the values; the heads may be folded into the batch, as in
`baddbmm(bias, Q, Kᵀ)` over `(batch·heads, tokens, dim)` (`_attention_folded.py`). From
there, each of `Q`, `K`, `V` is traced back to the one `nn.Linear` that produces it, and
the output forward to the `nn.Linear` that reads it; nothing is matched by name.

What lies between a projection and the core (head reshapes, transposes, rotary embeddings,
a query scaling, the repetition of key-value heads) is measured, not assumed: the map from
the projection's output to the core's input is probed with basis vectors (it must be linear
and act token by token, which is checked on a random input). Per head and token it is a
`(head_dim, head_dim)` matrix `M_t` on the projection outputs the head reads (one block, or
rows spread over the projection, as CodeGen's model-parallel partitions). The scores
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

from ..attention._factors import (
    HeadPermFactor,
    KeyShiftFactor,
    ValueBiasShift,
    ValueShiftFactor,
    attention_factors,
)
from ..attention._layout import HeadLayout, Slot
from ..groups import Breaker, MatTerm, PermTerm, PermutationFactor, RescalingFactor, Scale
from ..groups._algebra import AlgebraFactor, Repeat, commutant_basis
from ..groups._free import FreeRows
from ..groups._translation import Shift
from ._attention_folded import (
    folds_leading,
    head_varying,
    scores_product,
    untranspose_last,
)
from ._attention_gain import Gain, gain_key_shift, gain_qk_factor
from ._attention_trace import Linear, Proj, Skip, linear_sources, trace_input, trace_output
from ._head_norm_find import head_norm_kernel
from ._kernel import MeanKernel, ReaderSlot
from ._ops import graph_users, passes_input
from ._same import shared_cores
from ._scaled import unscaled_keys
from ._score_maps import SCORE_MAPS
from ._shifts import AbsorbedShiftFactor, IntoLinears
from ._value_row_one import AlongOne
from ._value_row_shift import value_row_shift

__all__ = ["attention_from_graph", "drop_key_compensation", "key_bias_rows"]

aten = torch.ops.aten
_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_SOFTMAX = {torch.softmax, F.softmax, aten.softmax.int, aten._softmax.default}
_RELU = {torch.relu, F.relu, aten.relu.default}
_MATMUL = {torch.matmul, operator.matmul, aten.matmul.default, torch.bmm, aten.bmm.default}
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
    #: elementwise nonlinear maps of the scores before the softmax (soft-capping's `tanh`,
    #: see `_score_maps.py`): no constant per query passes them, so no key shift
    mapped: tuple[str, ...] = ()
    #: the map of the scores: `"softmax"` over keys; `"relu"` of a scaled product (eq. (35)
    #: with a positively homogeneous `φ`: the `α` of eq. (37)); `"map"`: a ReLU of scores
    #: with something added (no `α`). Neither ReLU has shifts: its rows do not sum to one.
    phi: str = "softmax"


def attention_from_graph(
    gm: fx.GraphModule, root: nn.Module, values: dict[fx.Node, Any]
) -> tuple[list, list[Breaker], set[str], dict[str, list[tuple[int, int]]]]:
    """`(factors, breakers, projections, keys)`: the attention factors of every core in
    `gm`, the breakers explaining what was left out, the query, key and value projections
    whose output rescalings and permutations the factors contain (the caller drops those),
    and per key projection weight the output ranges that feed softmax keys through the same
    map at every token (a constant there is one constant on every key). `values` holds
    each node's value on the example inputs."""
    factors, breakers, covered = [], [], set()
    keys: dict[str, list[tuple[int, int]]] = {}
    cores = _cores(gm, values)
    if cores and any(isinstance(v, Tensor) and v.is_meta for v in values.values()):
        # the maps between projections and cores are measured, which needs values
        why = "attention not analyzed on the meta device: its maps are measured on values"
        return [], [Breaker(c.out.name, why) for c in cores], set(), {}
    for core in cores:
        try:
            fs, names, pk, key_rows = _core_factors(core, root, values)
        except Skip as exc:
            why = f"attention pattern not analyzed: {exc}"
            try:  # the values and output alone (the scores are whatever they are)
                fs, names = _value_output_only(core, root, values)
                part = "query-key"
            except Skip:
                try:  # the scores alone (whatever reads the values)
                    fs, names = _query_key_only(core, root, values)
                    part = "value-output"
                except Skip:
                    breakers.append(Breaker(core.out.name, why))
                    continue
            breakers.append(Breaker(core.out.name, f"{part} part of the {why}"))
            factors += fs + _untraced_norm_kernels(core, root, values)
            covered |= names
            continue
        factors += fs
        covered |= names
        # a constant on the projection's key rows stays one constant on every key only
        # when the map to the core is the same at every token (not under rotary), and the
        # softmax removes it only when no nonlinear map of the scores comes first
        if isinstance(pk.lin, Gain) or core.phi != "softmax":
            continue  # no key rows of a projection, or no softmax to remove a constant
        same = torch.allclose(pk.maps, pk.maps[:, :1].expand_as(pk.maps))
        if pk.regular and pk.stride == 1 and same and not core.mapped:
            width = pk.maps.shape[0] * pk.maps.shape[-1]
            keys.setdefault(pk.lin.weight, []).append((pk.offset, pk.offset + width))
        else:  # under rotary: the coordinates every score map treats alike (unrotated)
            keys.setdefault(pk.lin.weight, []).extend(key_rows)
    factors, shared = shared_cores(factors)
    return factors, breakers + shared, covered, keys


# -- finding cores -------------------------------------------------------------------------
def _cores(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> list[_Core]:
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _SDPA:
            q, k, v = n.args[:3]
            mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
            gqa = bool(n.kwargs.get("enable_gqa", False))
            out.append(_Core(q, k, v, n, gqa, (mask,) if isinstance(mask, fx.Node) else ()))
        elif n.target in _SOFTMAX and _softmax_last(n, values):
            core = _manual_core(n, values, gm)
            if core is not None:
                out.append(core)
        elif n.target in _RELU and len(n.args) == 1 and not n.kwargs:
            core = _manual_core(n, values, gm)
            # `relu(α s) = α relu(s)` only for scores that are a scaled product: a mask or
            # bias added, or a map of the scores, does not scale with them (no `α` then)
            if core is not None:
                homogeneous = not core.added and not core.mapped
                out.append(dataclasses.replace(core, phi="relu" if homogeneous else "map"))
    return out


def _softmax_last(n: fx.Node, values: dict[fx.Node, Any]) -> bool:
    """The softmax runs over the last axis (the keys)."""
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    x = values.get(n.args[0])
    return dim == -1 or (isinstance(dim, int) and isinstance(x, Tensor) and dim == x.ndim - 1)


def _manual_core(sm: fx.Node, values: dict, root: nn.Module) -> _Core | None:
    # back from the softmax to the scores product; heads folded into the batch are viewed
    # as `(batch, heads)` and back on the way (`_attention_folded.py`)
    s = sm.args[0]
    added, chain = [], []
    while isinstance(s, fx.Node) and (_score_op(s) or _score_map(s) or folds_leading(s, values)):
        i = _scores_arg(s)
        if not folds_leading(s, values):
            others = [a for j, a in enumerate(s.args) if j != i and isinstance(a, fx.Node)]
            chain.append((s, others))
            added += others
        s = s.args[i]
    product = scores_product(s)
    if product is None:
        return None
    q, kt, bias = product
    added += bias
    kt = unscaled_keys(kt, values, root)
    k = _untranspose(kt) or untranspose_last(kt, values)
    if k is None:
        return None
    # nonlinear in the scores: a map of them, or an operation whose other operand is
    # computed from them too (`s * s`), or from the queries or keys themselves (DeBERTa's
    # relative terms `q · k_r` and `k · q_r`, with `k_r`, `q_r` from the same projections):
    # no constant per query passes them, so the key bias turns with the keys, unshifted
    mapped = [
        c.name
        for c, others in chain
        if _score_map(c)
        or any(_reads(a, s) or _reads(a, q, values) or _reads(a, k, values) for a in others)
    ]
    # forward from the softmax to the values matmul
    p = sm
    while len(graph_users(p)) == 1:  # `torch.export`'s dtype checks on a cast read nothing
        (u,) = graph_users(p)
        if u.target in _MATMUL and u.args[0] is p:
            return _Core(q, k, u.args[1], u, added=tuple(added), mapped=tuple(mapped))
        if (u.op == "call_function" and u.target in _PROB_OPS) or folds_leading(u, values):
            p = u
            continue
        if passes_input(u, root):  # dropout in eval mode
            p = u
            continue
        return None
    return None


def _reads(a: Any, s: Any, values: dict | None = None) -> bool:
    """`a` is computed from `s` (or is `s`); with `values`, from the values of `s`: only
    paths through tensors count, not those through numbers (a `1/√d_head` read off the
    queries' shape)."""
    stack, seen = [a], set()
    while stack:
        n = stack.pop()
        if n is s:
            return True
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if values is not None and not isinstance(values.get(n), Tensor):
            continue
        seen.add(n)
        stack += n.all_input_nodes
    return False


def _score_op(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target is aten.where.self:
        return len(n.args) == 3 and not n.kwargs  # `where(mask, scores, fill)`
    return n.op == "call_function" and n.target in _SCORE_OPS


def _scores_arg(n: fx.Node) -> int:
    """Which argument of a score operation carries the scores: the second of `where(mask,
    scores, fill)` (GPT-Neo's causal mask), else the first."""
    return 1 if n.op == "call_function" and n.target is aten.where.self else 0


def _score_map(n: fx.Node) -> bool:
    """`n` is an elementwise nonlinear map of one tensor (`_score_maps.py`)."""
    if n.op == "call_method":
        return str(n.target) in SCORE_MAPS and len(n.args) == 1 and not n.kwargs
    return n.op == "call_function" and n.target in SCORE_MAPS and len(n.args) == 1 and not n.kwargs


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
# -- factors ---------------------------------------------------------------------------------
def _scalar_maps(maps: Tensor) -> bool:
    """Every `M` a multiple of the identity (same multiple for each token's head)."""
    d = maps.shape[-1]
    c = maps[..., 0, 0]
    return torch.allclose(maps, c[..., None, None] * torch.eye(d, dtype=maps.dtype))


def _core_factors(
    core: _Core, root: nn.Module, values: dict
) -> tuple[list, set[str], Proj, list[tuple[int, int]]]:
    """The factors of one core, the projections they cover, the key projection and, under
    score maps that differ between tokens (rotary), the ranges of its key rows on which a
    constant moves every query's scores by one number (`_constant_key_coords`)."""
    ends = [values[n] for n in (core.q, core.k, core.v, core.out)]
    folded = _folded(ends)
    pq = trace_input(core.q, root, values, folded=folded)
    pk = trace_input(core.k, root, values, folded=folded)
    pv = trace_input(core.v, root, values, folded=folded)
    H, T, dh = pq.maps.shape[0], pq.maps.shape[1], pq.maps.shape[-1]
    if folded and not pk.maps.shape[0] == pv.maps.shape[0] == H:
        raise Skip("queries, keys and values fold different numbers of heads")
    po, o_off = trace_output(core.out, root, values, heads=H if folded else 0)
    dv = pv.maps.shape[-1]
    if not torch.equal(pq.source_head, torch.arange(H)):
        raise Skip("query heads are not the projection's blocks in order")
    # key-value group of every query head; one key-value head broadcast over the query
    # heads (multi-query attention without `enable_gqa`, as Falcon's) is one group
    repeat = core.gqa or (H > 1 and pk.maps.shape[0] == 1 and pv.maps.shape[0] == 1)
    kv_of, k_maps = _per_query_head(pk, H, repeat)
    v_src, v_maps = _per_query_head(pv, H, repeat)
    if not torch.equal(v_src, kv_of):
        raise Skip("values and keys are grouped differently")
    if isinstance(pv.lin, Gain):
        raise Skip("values go through a gain (a normalization) before the attention")
    gains = isinstance(pq.lin, Gain) or isinstance(pk.lin, Gain)
    hkv, rep = _groups(kv_of, H)
    if not _scalar_maps(v_maps):
        raise Skip("values are transformed (rotated) before the attention")
    names = [pq.name, pk.name, pv.name, po.name]
    prefix = _common_prefix(names)
    modules = tuple(dict.fromkeys(names))
    covered = {p.lin.tag for p in (pq, pk, pv) if not isinstance(p.lin, Gain)}
    # the score matrices P_ts = M_tᵀ N_s, per head
    P = torch.einsum("htij,hsik->htsjk", pq.maps.double(), k_maps.double())
    P = P.reshape(H * T * T, dh, dh)
    basis = commutant_basis(P)
    axes = {p.lin.out_axis for p in (pq, pk, pv)} | {po.in_axis ^ 1}
    plain = all(p.regular and p.stride == 1 for p in (pq, pk, pv))
    layout = basis is None and hkv == H and len(axes) == 1 and plain and not gains
    softmax = core.phi == "softmax"
    if core.phi == "relu" and not layout:
        raise Skip("ReLU scores outside one plain block per head (the α is written for that)")
    if layout:

        def slot(p: Proj) -> Slot:
            return Slot(p.lin.weight, p.offset, p.lin.bias, p.offset)

        lay = HeadLayout(
            prefix or _label(pq),
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
        # mapped scores: the key bias turns with the keys, and no key shift (`_score_maps.py`)
        fs = attention_factors(
            lay,
            shapes,
            softmax=softmax,
            homogeneous=core.phi == "relu",
            modules=modules,
            key_shift=softmax and not core.mapped,
        )
        if softmax:  # the value-row shift needs rows of weights that sum to one
            fs = _with_value_row_shift(fs, lay, pv, po, o_off, modules, root, values)
        if _per_head_scores(core, values, H, folded):
            # a position bias that differs between heads: permuting heads would need it too
            fs = [f for f in fs if not isinstance(f, HeadPermFactor)]
        return fs, covered, pk, []
    name = prefix or _label(pq)
    if gains and not softmax:
        raise Skip("ReLU scores read through a gain (a normalization)")

    # query-key: per key-value group, in the commutant of the score maps; only its diagonal
    # part where a gain (a normalization) feeds the queries or keys (`_attention_gain.py`)
    if gains:
        k_rows = pk.rows.repeat_interleave(H // pk.rows.shape[0], 0)
        sides = ((pq.lin, pq.rows), (pk.lin, k_rows))
        qk = gain_qk_factor(name, sides, P, root, values, modules)
    else:
        qk_terms = _proj_terms(pq, "T", rep) + _proj_terms(pk, "inv")
        qk = AlgebraFactor(
            f"{name}.qk", dh, hkv, basis=basis, terms=tuple(qk_terms), modules=modules
        )
    vo, *shifts = _value_output(name, pv, po, o_off, hkv, rep, modules, root, values)
    if not softmax:  # value shifts need rows of weights that sum to one
        shifts = []
    # a nonlinear map of the scores before the softmax (soft-capping) keeps no constant
    if gains:  # head permutations are not derived through gains
        return (
            [
                qk,
                vo,
                *shifts,
                *_through_gains(name, pq, pk, k_rows, P, core, qk, root, values, modules),
            ],
            covered,
            pk,
            [],
        )
    sel = None if core.mapped or not softmax else _constant_key_coords(P.reshape(H, T, T, dh, dh))
    if softmax:
        shifts += _key_shift(name, pk, sel, hkv, qk, modules)
    perms = []
    if not _per_head_scores(core, values, H, folded):
        perms = _group_permutations(
            name, pq, pk, pv, po, o_off, hkv, rep, (qk, vo), modules, shifts
        )
    return [qk, vo, *shifts, *perms], covered, pk, _key_row_ranges(pk, sel, hkv)


def _through_gains(
    name: str,
    pq: Proj,
    pk: Proj,
    k_rows: Tensor,
    P: Tensor,
    core: _Core,
    qk: Any,
    root: nn.Module,
    values: dict,
    modules: tuple[str, ...],
) -> list:
    """Where a gain (a normalization) feeds the queries or keys: the kernel of the
    normalization in its projection's rows (`_head_norm_find.py`), and the shift of the key
    gain's `β` where softmax removes it (`gain_key_shift`)."""
    out = []
    for side, p in (("q", pq), ("k", pk)):
        if isinstance(p.lin, Gain):
            f = head_norm_kernel(f"{name}.{side}_norm_kernel", p.lin, root, values)
            out += [f] if f is not None else []
    H, T, dh = pq.maps.shape[0], pq.maps.shape[1], pq.maps.shape[-1]
    sel = None if core.mapped else _constant_key_coords(P.reshape(H, T, T, dh, dh))
    if isinstance(pk.lin, Gain) and sel is not None:
        out += gain_key_shift(name, pk.lin, k_rows, sel, qk, root, values, modules)
    return out


def _untraced_norm_kernels(core: _Core, root: nn.Module, values: dict) -> list:
    """The kernels of the normalizations (gains) feeding the queries and keys of a core whose
    query-key part is not analyzed (several gains on one input, as a LayerNorm per head
    whose results are joined): each normalization's kernel in its projection's rows holds
    whatever the scores are, as it changes no normalized output (`_head_norm_find.py`)."""
    out = []
    for node in (core.q, core.k):
        try:
            sources = linear_sources(node, root, values)
        except Skip:
            continue
        for g in sources:
            if isinstance(g, Gain):
                f = head_norm_kernel(f"{g.name}.norm_kernel", g, root, values)
                out += [f] if f is not None else []
    return out


def _value_output_only(core: _Core, root: nn.Module, values: dict) -> tuple[list, set[str]]:
    """The value-output `GL` (and the value-bias shift) of a core whose queries or keys the
    analysis cannot trace: the softmax weights do not read the values, so `W_v ↦ Gᵀ W_v`,
    `W_o ↦ W_o G⁻ᵀ` per key-value head keeps the output whatever computes the scores. No head
    permutations (they would move the scores' heads too)."""
    if _folded([values[n] for n in (core.q, core.k, core.v, core.out)]):
        raise Skip("heads folded into the batch")
    pv = trace_input(core.v, root, values)
    if isinstance(pv.lin, Gain):
        raise Skip("values go through a gain")
    H = int(values[core.out].shape[1])
    po, o_off = trace_output(core.out, root, values)
    kv_of, v_maps = _per_query_head(pv, H, core.gqa or (pv.maps.shape[0] == 1 and H > 1))
    hkv, rep = _groups(kv_of, H)
    if not _scalar_maps(v_maps):
        raise Skip("values are transformed (rotated) before the attention")
    modules = tuple(dict.fromkeys([pv.name, po.name]))
    name = _common_prefix([pv.name, po.name]) or _label(pv)
    fs = _value_output(name, pv, po, o_off, hkv, rep, modules, root, values)
    # the shifts move the values by one vector per head, which only rows of weights that
    # sum to one (a softmax) pass on unchanged
    return (fs if core.phi == "softmax" else fs[:1]), {pv.lin.tag}


def _query_key_only(core: _Core, root: nn.Module, values: dict) -> tuple[list, set[str]]:
    """The query-key `GL` of a core whose output the analysis cannot trace to a projection
    (eq. (35) as printed: the attention's output is the model's): the scores read only the
    queries and keys, so `W_q ↦ W_q A`, `W_k ↦ W_k A⁻ᵀ` per key-value group, in the
    commutant of the score maps, keeps them whatever reads the output. No head permutations
    (they would move the output's heads too), no gains (`_attention_gain.py` needs the
    whole core)."""
    folded = _folded([values[n] for n in (core.q, core.k, core.v, core.out)])
    pq = trace_input(core.q, root, values, folded=folded)
    pk = trace_input(core.k, root, values, folded=folded)
    if isinstance(pq.lin, Gain) or isinstance(pk.lin, Gain):
        raise Skip("queries or keys go through a gain")
    H, T, dh = pq.maps.shape[0], pq.maps.shape[1], pq.maps.shape[-1]
    if not torch.equal(pq.source_head, torch.arange(H)):
        raise Skip("query heads are not the projection's blocks in order")
    kv_of, k_maps = _per_query_head(pk, H, core.gqa or (H > 1 and pk.maps.shape[0] == 1))
    hkv, rep = _groups(kv_of, H)
    P = torch.einsum("htij,hsik->htsjk", pq.maps.double(), k_maps.double())
    basis = commutant_basis(P.reshape(H * T * T, dh, dh))
    modules = tuple(dict.fromkeys([pq.name, pk.name]))
    name = _common_prefix([pq.name, pk.name]) or _label(pq)
    terms = _proj_terms(pq, "T", rep) + _proj_terms(pk, "inv")
    qk = AlgebraFactor(f"{name}.qk", dh, hkv, basis=basis, terms=tuple(terms), modules=modules)
    if core.phi != "relu" or rep != 1:
        return [qk], {pq.lin.tag, pk.lin.tag}
    # ReLU scores: the `α` of eq. (37), `W_k ↦ α W_k`, `W_v ↦ α⁻¹ W_v` per head (no output
    # projection: a plain rescaling of those rows, canonicalized by their norms)
    pv = trace_input(core.v, root, values, folded=folded)
    if isinstance(pv.lin, Gain) or pv.maps.shape[0] != H or not _scalar_maps(pv.maps):
        return [qk], {pq.lin.tag, pk.lin.tag}
    scales = [*_head_scales(pk, H, 1, root), *_head_scales(pv, H, -1, root)]
    alpha = RescalingFactor(f"{name}.alpha", H, terms=tuple(scales), modules=modules)
    return [qk, alpha], {pq.lin.tag, pk.lin.tag}


def _head_scales(p: Proj, H: int, power: int, root: nn.Module) -> list[Scale]:
    """`Scale` terms multiplying each head's rows of `p`'s weight (and bias) by `α_h^power`
    (index `H`: not scaled)."""
    rows = p.block_rows()  # (heads, dh), in source-head order
    w = root.get_parameter(p.lin.weight)
    idx = torch.full((w.shape[p.lin.out_axis],), H, dtype=torch.long)
    for h in range(H):
        idx[rows[int(p.source_head[h])]] = h
    shape = [1, 1]
    shape[p.lin.out_axis] = -1
    out = [Scale(p.lin.weight, idx.reshape(shape), power)]
    if p.lin.bias is not None:
        out.append(Scale(p.lin.bias, idx, power))
    return out


def _per_query_head(p: Proj, H: int, repeat: bool) -> tuple[Tensor, Tensor]:
    """`p`'s source head and map for each of the `H` query heads: its own heads, or, when
    `repeat`, each repeated for the query heads it serves (grouped- or multi-query
    attention, the key-value heads not expanded before the core)."""
    if not repeat:
        return p.source_head, p.maps
    h = p.maps.shape[0]
    if H % h:
        raise Skip("query heads are not a multiple of key-value heads")
    return p.source_head.repeat_interleave(H // h), p.maps.repeat_interleave(H // h, 0)


def _groups(kv_of: Tensor, H: int) -> tuple[int, int]:
    """`(key-value groups, query heads per group)` from the group of each of the `H` query
    heads, which must be consecutive."""
    hkv = int(kv_of.max()) + 1
    rep = H // hkv
    if not torch.equal(kv_of, torch.arange(hkv).repeat_interleave(rep)):
        raise Skip("query heads are not grouped by consecutive key-value heads")
    return hkv, rep


def _proj_terms(p: Proj, mode: str, times: int = 1) -> list:
    """The matrix terms of a projection's head rows (weight and bias; listed rows where the
    heads are not evenly spaced blocks, as CodeGen's partitions), repeated `times`."""
    where = {} if p.regular else {"rows": tuple(p.block_rows().reshape(-1).tolist())}
    out = [MatTerm(p.lin.weight, p.lin.out_axis, p.offset, mode, p.stride or 1, **where)]
    if p.lin.bias is not None:
        out.append(MatTerm(p.lin.bias, 0, p.offset, mode, p.stride or 1, **where))
    return [Repeat(t, times) if times > 1 else t for t in out]


def _value_output(
    name: str,
    pv: Proj,
    po: Linear,
    o_off: int,
    hkv: int,
    rep: int,
    modules: tuple[str, ...],
    root: nn.Module,
    values: dict,
) -> list:
    """The value-output `GL` per key-value head (`W_v ↦ Gᵀ W_v`, `W_o ↦ W_o G⁻ᵀ`) and the
    value-bias shift (of a bias, or of bias-free rows reading a LayerNorm,
    `_value_row_shift.py`)."""
    o_term = MatTerm(po.weight, po.in_axis, o_off, "inv")
    vo_terms = [*_proj_terms(pv, "T"), Repeat(o_term, rep) if rep > 1 else o_term]
    dv = pv.maps.shape[-1]
    vo = AlgebraFactor(f"{name}.vo", dv, hkv, terms=tuple(vo_terms), modules=modules)
    shifts = _value_shift(name, pv, po, o_off, hkv, rep, vo, modules)
    shifts += value_row_shift(name, pv, po, o_off, hkv, rep, vo, modules, root, values)
    return [vo, *shifts]


def _with_value_row_shift(
    fs: list,
    lay: HeadLayout,
    pv: Proj,
    po: Linear,
    o_off: int,
    modules: tuple[str, ...],
    root: nn.Module,
    values: dict,
) -> list:
    """`fs` (the factors of one plain layer, `attention_factors`) with the value-bias shift
    of bias-free value rows reading a LayerNorm (`_value_row_shift.py`), carried by the
    head permutations."""
    vo = next(f for f in fs if f.name == lay.name("vo"))
    extra = value_row_shift(
        lay.prefix or _label(pv), pv, po, o_off, lay.heads, 1, vo, modules, root, values
    )
    if not extra:
        return fs
    (f,) = extra
    if isinstance(f.terms[0], AlongOne):  # one number, which a permutation of heads keeps
        return fs + extra
    conj = (f.name, torch.arange(f.dim).reshape(lay.heads, -1))
    out = [
        dataclasses.replace(g, conjugates=(*g.conjugates, conj))
        if isinstance(g, HeadPermFactor)
        else g
        for g in fs
    ]
    return out + extra


def _key_row_ranges(pk: Proj, sel: Tensor | None, hkv: int) -> list[tuple[int, int]]:
    """The rows `sel` of each of the `hkv` key heads of `pk`, as contiguous ranges."""
    if sel is None:
        return []
    out: list[tuple[int, int]] = []
    for r in pk.block_rows()[:hkv, sel].reshape(-1).tolist():
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def _constant_key_coords(P: Tensor) -> Tensor | None:
    """The head coordinates `sel` on which a constant `c` of a key head moves the score of
    query `t` and key `s`, `z_qᵀ P_ts c`, by the same amount for every key (`c` in the
    kernel of every `P_ts − P_ts'`; `P`: `(H, T, T, d, d)`, all heads at once): under
    rotary embeddings the unrotated part of each head. `None` when that kernel is `0` or is
    not spanned by coordinates."""
    dh = P.shape[-1]
    diff = (P - P[:, :, :1]).reshape(-1, dh)
    tol = 1e-10 * max(1.0, float(P.abs().max()))
    sel = torch.nonzero(diff.abs().amax(0) <= tol).reshape(-1)
    m = int(sel.numel())
    if m == 0 or int(torch.linalg.matrix_rank(diff, atol=tol)) != dh - m:
        return None
    return sel


def _value_shift(
    name: str,
    pv: Proj,
    po: Linear,
    o_off: int,
    hkv: int,
    rep: int,
    vo: AlgebraFactor,
    modules: tuple[str, ...],
) -> list[ValueShiftFactor]:
    """The value-bias shift: softmax weights sum to one, so a shift `u` of the value bias
    leaves each head's output shifted by `u` (by its key-value head's `u` under grouped
    queries), which the output bias takes back (`b_o ↦ b_o − W_o u`). Needs both biases and
    values read as they are projected (checked by the caller)."""
    if pv.lin.bias is None or po.bias is None:
        return []
    listed = None if pv.regular else tuple(pv.block_rows()[:hkv].reshape(-1).tolist())
    dv = pv.maps.shape[-1]
    term = ValueBiasShift(
        pv.lin.bias,
        pv.offset,
        po.weight,
        po.in_axis,
        o_off,
        po.bias,
        repeat=rep,
        block=dv,
        stride=pv.stride or 1,
        rows=listed,
    )
    return [
        ValueShiftFactor(
            f"{name}.value_shift",
            hkv * dv,
            terms=(term,),
            moved_by=((vo.name, "T"),),
            modules=modules,
        )
    ]


def _key_shift(
    name: str, pk: Proj, sel: Tensor | None, hkv: int, qk: AlgebraFactor, modules: tuple[str, ...]
) -> list[KeyShiftFactor]:
    """The key-bias shift where the score maps allow it: on the coordinates `sel` of each
    key head (`_constant_key_coords`), which the query-key elements (they commute with
    every score map) then map to themselves: the shift's block of key head `k` moves by
    the `sel` rows and columns of `G_k⁻¹` (`moved_by`)."""
    if pk.lin.bias is None or sel is None:
        return []
    m = int(sel.numel())
    rows = pk.block_rows()[:hkv, sel].reshape(-1)
    return [
        KeyShiftFactor(
            f"{name}.key_shift",
            hkv * m,
            terms=(FreeRows(pk.lin.bias, rows, 1),),
            moved_by=((qk.name, "inv", 0, m, sel),),
            modules=modules,
        )
    ]


def _group_permutations(
    name: str,
    pq: Proj,
    pk: Proj,
    pv: Proj,
    po: Linear,
    o_off: int,
    hkv: int,
    rep: int,
    matrices: tuple,
    modules: tuple[str, ...],
    shifts: list = (),
) -> list[PermutationFactor]:
    """Permutations of the key-value groups (each with its query heads), and of the query
    heads within each group (they share the group's key and value)."""
    dv = pv.maps.shape[-1]

    def blocks(p: Proj) -> list[PermTerm]:
        # group g's entries: the rows of its heads (strided: heads packed with the other
        # projections, as GPT-NeoX's query-key-value rows; or spread, as CodeGen's)
        idx = p.block_rows()[: hkv * (rep if p is pq else 1)].reshape(hkv, -1)
        out = [PermTerm(p.lin.weight, p.lin.out_axis, idx)]
        if p.lin.bias is not None:
            out.append(PermTerm(p.lin.bias, 0, idx))
        return out

    o_idx = o_off + torch.arange(hkv * rep * dv).reshape(hkv, rep * dv)
    terms = [*blocks(pq), *blocks(pk), *blocks(pv), PermTerm(po.weight, po.in_axis, o_idx)]
    conj = tuple((m.name, torch.arange(hkv)) for m in matrices)
    # the shift along `1` is one number, which a permutation of whole heads keeps
    per_head = [f for f in shifts if not isinstance(f.terms[0], AlongOne)]
    conj += tuple((f.name, torch.arange(f.dim).reshape(hkv, -1)) for f in per_head)
    out = [
        PermutationFactor(
            f"{name}.kv_groups", hkv, terms=tuple(terms), conjugates=conj, modules=modules
        )
    ]
    if rep == 1:
        return out
    for g in range(hkv):
        qi = pq.block_rows()[g * rep : (g + 1) * rep]
        oi = o_off + g * rep * dv + torch.arange(rep * dv).reshape(rep, dv)
        heads = [PermTerm(pq.lin.weight, pq.lin.out_axis, qi)]
        if pq.lin.bias is not None:
            heads.append(PermTerm(pq.lin.bias, 0, qi))
        heads.append(PermTerm(po.weight, po.in_axis, oi))
        out.append(
            PermutationFactor(f"{name}.heads[{g}]", rep, terms=tuple(heads), modules=modules)
        )
    return out


def _folded(ends: list) -> bool:
    """Queries, keys, values and output are `(batch·heads, tokens, dim)` (heads folded into
    the batch, `_attention_folded.py`) rather than `(batch, heads, tokens, dim)`."""
    q = ends[0]
    if isinstance(q, Tensor) and q.ndim == 4:
        return False
    if all(isinstance(v, Tensor) and v.ndim == 3 for v in ends):
        return True
    raise Skip("queries are not (batch, heads, tokens, dim) nor (batch·heads, tokens, dim)")


def _per_head_scores(core: _Core, values: dict, heads: int, folded: bool = False) -> bool:
    """Something added to the scores differs between heads (a relative position bias, ALiBi);
    scores are `(batch, heads, queries, keys)`, or `(batch·heads, queries, keys)` when
    `folded`."""
    rows = int(values[core.q].shape[0]) if folded else 0
    return any(head_varying(values.get(a), heads, rows) for a in core.added)


def _label(p: Proj) -> str:
    """A projection's name for the factors of its core when the maps share no module: its
    module, or its weight's name when the weight sits at the model's root (`x @ W_q`)."""
    return getattr(p.lin, "tag", None) or p.name


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        out.append(seg[0])
    return ".".join(out)


def drop_key_compensation(
    factors: list, root: nn.Module, key_rows: dict[str, list[tuple[int, int]]] | None = None
) -> list:
    """Shifts of a LayerNorm's `β` need not be taken back by the key projections of a
    softmax attention: a constant added to every key moves each query's scores by one
    number, which softmax removes (the `key_shift` factor). Leaving the key biases out keeps
    the shift commuting with the query-key `GL`, which does not move the key bias. The same
    holds for the constant a LayerNorm kernel adds to the keys. Only the key entries of a
    bias are left out: queries and values packed into the same bias (GPT-2's `c_attn`)
    keep their compensation.

    `key_rows` (per weight, the output ranges feeding softmax keys) settles the readers that
    the LayerNorm rules left pending because they have no bias (Whisper's key projection):
    a pending kernel slot is kept only inside key rows, a shift only if every pending
    reader is a key projection; anything else is dropped."""
    rows = dict(key_rows or {})
    keys = key_bias_rows(factors)
    out = []
    for f in factors:
        terms = getattr(f, "terms", ())
        if isinstance(f, AbsorbedShiftFactor) and any(isinstance(t, IntoLinears) for t in terms):
            settled = [
                _settle_shift(t, keys, rows, root) if isinstance(t, IntoLinears) else t
                for t in terms
            ]
            if all(t is not None for t in settled):
                out.append(dataclasses.replace(f, terms=tuple(settled)))
            continue
        kern = getattr(f, "kernel", None)
        if isinstance(kern, MeanKernel) and any(sl.pending or sl.bias in keys for sl in kern.slots):
            slots = _settle_slots(kern.slots, keys, rows)
            if slots:
                new = dataclasses.replace(kern, slots=tuple(slots))
                out.append(dataclasses.replace(f, terms=(new,), n=sum(sl.size for sl in slots)))
            continue
        out.append(f)
    return out


def key_bias_rows(factors: list) -> dict[str, list[tuple[int, int]]]:
    """Per key bias, the entries that a key shift moves (whole key heads, not their
    unrotated part): a LayerNorm's shift or kernel leaves them uncompensated."""
    keys: dict[str, list[tuple[int, int]]] = {}
    for f in factors:
        if isinstance(f, KeyShiftFactor) and isinstance(f.terms[0], Shift):
            t = f.terms[0]
            keys.setdefault(t.param, []).append((t.offset, t.offset + f.dim))
    return keys


def _settle_shift(
    t: IntoLinears,
    keys: dict[str, list[tuple[int, int]]],
    rows: dict[str, list[tuple[int, int]]],
    root: nn.Module,
) -> IntoLinears | None:
    """`t` without compensation on key-bias entries, or `None` when a pending reader is not
    wholly a softmax key projection."""
    if not all(_whole_key(w, w in t.transposed, rows, root) for w in t.pending):
        return None
    kept = []
    for w, b, r in t.consumers:
        if b not in keys:
            kept.append((w, b, r))
            continue
        lo, hi = r or (0, root.get_parameter(b).shape[0])
        kept += [(w, b, (x, y)) for x, y, key in _pieces(lo, hi, keys[b]) if not key]
    return dataclasses.replace(t, consumers=tuple(kept), pending=())


def _settle_slots(
    slots: tuple[ReaderSlot, ...],
    keys: dict[str, list[tuple[int, int]]],
    rows: dict[str, list[tuple[int, int]]],
) -> list[ReaderSlot]:
    """Kernel slots with pending ones kept only on key rows (cut to the pieces that key rows
    hold: under rotary, the unrotated coordinates of each head), and slots over a key bias
    split so that its key entries go uncompensated."""
    out = []
    for sl in slots:
        if sl.pending:
            out += [
                dataclasses.replace(sl, start=lo, stop=hi, pending=False)
                for lo, hi, key in _pieces(sl.start, sl.stop, rows.get(sl.weight, []))
                if key
            ]
        elif sl.bias not in keys:
            out.append(sl)
        else:
            out += [
                dataclasses.replace(sl, start=lo, stop=hi, bias=None if key else sl.bias)
                for lo, hi, key in _pieces(sl.start, sl.stop, keys[sl.bias])
            ]
    return out


def _whole_key(
    weight: str, transposed: bool, rows: dict[str, list[tuple[int, int]]], root: nn.Module
) -> bool:
    """Every output of the linear map `weight` (stored `(in, out)` when `transposed`) feeds
    softmax keys."""
    outs = int(root.get_parameter(weight).shape[1 if transposed else 0])
    return any(a == 0 and b == outs for a, b in rows.get(weight, []))


def _pieces(lo: int, hi: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """`[lo, hi)` cut at the ends of `ranges` inside it: `(start, stop, covered)` per piece,
    `covered` when one of `ranges` holds the piece."""
    ends = {e for a, b in ranges for e in (a, b) if lo < e < hi}
    cut = sorted({lo, hi, *ends})
    return [(a, b, any(x <= a and b <= y for x, y in ranges)) for a, b in zip(cut, cut[1:])]
