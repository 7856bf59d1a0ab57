"""Query and key gains: a normalization of the queries or keys before the attention core
(Qwen3's and Gemma 3's per-head RMSNorm, OLMo 2's RMSNorm over all heads, Cohere's per-head
LayerNorm), whatever module wrote it.

Such a normalization ends in a gain, `g = x̂ ⊙ γ` (sometimes `x̂ ⊙ (γ + c)`, then `+ β`), a
parameter multiplying the features elementwise. What comes before the gain is nonlinear and
breaks the query-key `GL` of the projections; the gain is a linear map of its own, diagonal,
and the analysis of `_attention.py` applies to it as to a projection: with the score maps
`P_ts = M_tᵀ N_s` measured from the gains' outputs to the core, `q ↦ D q`, `k ↦ D⁻¹ k` keeps
every score exactly when `D` commutes with every `P_ts`. A gain can only take a diagonal `D`,
so the group is the diagonal part of the commutant: one positive scale per class of head
coordinates that some score map links (a rotary plane, or one unrotated coordinate), per
query head, tied across heads where they share entries (a gain shared by all heads, or a
key head read by several query heads). It moves `γ` and `β` of the query gain by `s`, those
of the key gain (or the rows of a key projection, when only the queries are normalized) by
`1 / s`.

Nothing about the normalization itself is assumed: only the gain is found (a product with a
parameter whose shape is a suffix of the features', broadcast over batch and tokens, read
nowhere else), and the map from it to the core is measured, as for projections.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..attention._factors import KeyShiftFactor
from ..groups import OffsetScale, RescalingFactor, Scale
from ..groups._base import State
from ._linear import Linear, param_name
from ._offset_gain import offset_gain
from ._ops import ADDITIONS, graph_users, is_cast

__all__ = ["Gain", "as_gain", "gain_entries", "gain_key_shift", "gain_qk_factor"]

aten = torch.ops.aten
_MULS = {torch.mul, operator.mul, aten.mul.Tensor}


@dataclass(frozen=True)
class Gain(Linear):
    """`x ⊙ (γ + offset) (+ β)`: `weight` names `γ`, `bias` `β` (or `None`); `node` computes
    the result (the sum with `β` when there is one). Its features are the last
    `feature_axes` axes of the result (the axes after batch and tokens), `γ`'s shape a suffix
    of theirs (a gain shared by the heads is broadcast over them)."""

    offset: float = 0.0
    feature_axes: int = 1
    #: the result is `(batch, heads, tokens, dh)` (a gain of one axis): its features are its
    #: heads and `dh`
    head_first: bool = False
    #: the node the gain multiplies (`x` of `x ⊙ γ`; a LayerNorm module's input)
    source: Any = None


def _sole_param(a: Any, root: nn.Module) -> str | None:
    """The parameter `a` reads through casts, when nothing else reads it or the casts."""
    while isinstance(a, fx.Node) and is_cast(a) and len(graph_users(a)) == 1:
        a = a.args[0]
    name = param_name(a, root)
    if name is None or len(graph_users(a)) != 1:
        return None
    readers = [n for n in a.graph.nodes if n.op == "get_attr" and n.target == a.target]
    return name if len(readers) == 1 else None


def _features(out: Tensor, gamma: Tensor) -> int:
    """The number of feature axes of `out` (those after batch and tokens), when `gamma`'s
    shape is a suffix of theirs; else 0."""
    k = out.ndim - 2 if out.ndim > 2 else 1
    if gamma.ndim == 0 or gamma.ndim > k or tuple(out.shape[-gamma.ndim :]) != tuple(gamma.shape):
        return 0
    return k


def _product(n: fx.Node, root: nn.Module, values: dict) -> Gain | None:
    """`n = x ⊙ γ` (either order; `γ` read only here, maybe as `γ + c`), `γ` broadcast over
    the leading axes only."""
    if not (n.op == "call_function" and n.target in _MULS and len(n.args) == 2 and not n.kwargs):
        return None
    out = values.get(n)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return None
    for a, x in (n.args, n.args[::-1]):
        xv = values.get(x) if isinstance(x, fx.Node) else None
        if not isinstance(xv, Tensor) or xv.shape != out.shape:
            continue
        name, offset = _sole_param(a, root), 0.0
        if name is None:
            og = offset_gain(a, root)
            if og is None:
                continue
            name, offset = og.param, og.offset
        k = _features(out, root.get_parameter(name))
        if k:
            return Gain(n, name, None, 0, offset, k, source=x)
    return None


def _layernorm(n: fx.Node, root: nn.Module, values: dict) -> Gain | None:
    """`n` calls an `nn.LayerNorm` (its own `forward`) with a gain: `γ ⊙ x̂ + β`."""
    m = root.get_submodule(str(n.target))
    if not isinstance(m, nn.LayerNorm) or type(m).forward is not nn.LayerNorm.forward:
        return None
    out = values.get(n)
    if m.weight is None or not isinstance(out, Tensor):
        return None
    k = _features(out, m.weight)
    bias = f"{n.target}.bias" if m.bias is not None else None
    src = n.args[0] if n.args else None
    return Gain(n, f"{n.target}.weight", bias, 0, 0.0, k, source=src) if k else None


def as_gain(n: fx.Node, root: nn.Module, values: dict) -> Gain | None:
    """The gain `n` computes: `x ⊙ γ`, or `(x ⊙ γ) + β` with `β` of `γ`'s shape (read only
    there, the product read only by the sum), or an `nn.LayerNorm`'s; else `None`."""
    if n.op == "call_module":
        return _layernorm(n, root, values)
    if n.op == "call_function" and n.target in ADDITIONS and len(n.args) == 2 and not n.kwargs:
        for a, b in (n.args, n.args[::-1]):
            if not isinstance(a, fx.Node) or len(graph_users(a)) != 1:
                continue
            g = _product(a, root, values)
            beta = _sole_param(b, root)
            if g is None or beta is None:
                continue
            if root.get_parameter(beta).shape == root.get_parameter(g.weight).shape:
                return Gain(n, g.weight, beta, 0, g.offset, g.feature_axes, source=g.source)
        return None
    return _product(n, root, values)


def gain_entries(gain: Gain, root: nn.Module, values: dict) -> Tensor:
    """`(F,)`: the entry of `γ` (flat index) multiplying each of the gain's `F` features (its
    feature axes flattened)."""
    gamma = root.get_parameter(gain.weight)
    shape = values[gain.node].shape
    feats = (shape[1], shape[3]) if gain.head_first else tuple(shape[-gain.feature_axes :])
    return torch.arange(gamma.numel()).reshape(gamma.shape).expand(feats).reshape(-1)


class _Classes:
    """Union-find over hashable keys."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b) -> None:
        self.parent[self.find(a)] = self.find(b)


def _coordinate_classes(P: Tensor) -> list[int]:
    """`P`: `(n, d, d)` score maps. Class of each head coordinate: `i` and `j` share one when
    some map has a nonzero `(i, j)` or `(j, i)` entry (a diagonal `D` commutes with them all
    exactly when it is constant on each class)."""
    d = P.shape[-1]
    tol = 1e-10 * max(1.0, float(P.abs().max()))
    link = (P.abs() > tol).any(0)
    uf = _Classes()
    for i, j in (link | link.T).nonzero().tolist():
        uf.union(i, j)
    roots = [uf.find(i) for i in range(d)]
    first = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return [first[r] for r in roots]


def gain_qk_factor(
    name: str,
    sides: tuple[tuple[Linear, Tensor], tuple[Linear, Tensor]],
    P: Tensor,
    root: nn.Module,
    values: dict,
    modules: tuple[str, ...],
) -> RescalingFactor:
    """The query-key rescalings where a gain feeds the queries or the keys (module doc).

    `sides`: `(query map, rows)` and `(key map, rows)`, each map a `Gain` or a projection and
    its rows `(H, d)` the features each of the `H` query heads reads, coordinate by
    coordinate (a key head's rows repeated for each query head it serves); `P`: the score
    maps `(n, d, d)`."""
    cls = _coordinate_classes(P)
    H, d = sides[0][1].shape
    uf = _Classes()
    entries = []
    for side, (lin, rows) in enumerate(sides):
        ent = gain_entries(lin, root, values) if isinstance(lin, Gain) else None
        entries.append(ent)
        for h in range(H):
            for i in range(d):
                r = int(rows[h, i])
                uf.union(("var", h, cls[i]), (side, int(ent[r]) if ent is not None else r))
    slot: dict = {}
    for h in range(H):
        for c in sorted(set(cls)):
            slot.setdefault(uf.find(("var", h, c)), len(slot))
    n = len(slot)
    terms: list[Scale] = []
    for side, (lin, _) in enumerate(sides):
        power = 1 if side == 0 else -1
        keys = [k for k in uf.parent if k[0] == side]
        if isinstance(lin, Gain):
            shape = root.get_parameter(lin.weight).shape
            idx = torch.full((math.prod(shape),), n, dtype=torch.long)
            for k in keys:
                idx[k[1]] = slot[uf.find(k)]
            idx = idx.reshape(shape)
            if lin.offset:
                terms.append(OffsetScale(lin.weight, idx, power, lin.offset))
            else:
                terms.append(Scale(lin.weight, idx, power))
            if lin.bias is not None:
                terms.append(Scale(lin.bias, idx, power))
            continue
        outs = int(root.get_parameter(lin.weight).shape[lin.out_axis])
        idx = torch.full((outs,), n, dtype=torch.long)
        for k in keys:
            idx[k[1]] = slot[uf.find(k)]
        terms.append(Scale(lin.weight, idx[:, None] if lin.out_axis == 0 else idx[None, :], power))
        if lin.bias is not None:
            terms.append(Scale(lin.bias, idx, power))
    return RescalingFactor(f"{name}.qk_gains", n, terms=tuple(terms), modules=modules)


def gain_key_shift(
    name: str,
    key: Gain,
    rows: Tensor,
    sel: Tensor,
    qk: RescalingFactor,
    root: nn.Module,
    values: dict,
    modules: tuple[str, ...],
) -> list[KeyShiftFactor]:
    """The shift of the key gain's `β` on the coordinates `sel` of every key head, where a
    constant on a key head moves each query's scores by one number, which softmax removes
    (`_attention._constant_key_coords`: under rotary, the unrotated coordinates). `rows`:
    `(H, d)` the gain features each query head's keys read. Only the entries of `β` that
    no other coordinate reads are shifted; the query-key rescalings (`qk`, which scale `β`
    by `1/s`) are declared in `scaled_by`."""
    if key.bias is None or sel.numel() == 0:
        return []
    ent = gain_entries(key, root, values)
    inside = torch.zeros(rows.shape[-1], dtype=torch.bool)
    inside[sel] = True
    moved = set(ent[rows[:, inside]].reshape(-1).tolist())
    kept = set(ent[rows[:, ~inside]].reshape(-1).tolist())
    entries = torch.tensor(sorted(moved - kept), dtype=torch.long)
    if entries.numel() == 0:
        return []
    scale = next((t for t in qk.terms if getattr(t, "param", None) == key.bias), None)
    scaled = ()
    if scale is not None:
        idx = torch.broadcast_to(scale.index, root.get_parameter(key.bias).shape).reshape(-1)
        scaled = ((qk.name, idx[entries], -1),)
    return [
        KeyShiftFactor(
            f"{name}.key_shift",
            int(entries.numel()),
            terms=(_FlatEntries(key.bias, entries),),
            scaled_by=scaled,
            modules=modules,
        )
    ]


@dataclass(frozen=True)
class _FlatEntries:
    """`state[param].flatten()[index] += v`."""

    param: str
    index: Tensor

    def __call__(self, new: State, v: Tensor) -> None:
        p = new[self.param]
        flat = p.reshape(-1).index_add(0, self.index, v.to(p.dtype))
        new[self.param] = flat.reshape(p.shape)

    def entries(self, state: State) -> Tensor:
        """The shifted entries' values `(len(index),)` (a canonical form zeroes them)."""
        return state[self.param].reshape(-1)[self.index]
