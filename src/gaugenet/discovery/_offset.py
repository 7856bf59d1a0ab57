"""The offset group of a LayerNorm read only by linear maps, some without a bias.

A LayerNorm whose output `y = γ ⊙ n + β` only linear maps read has, besides its rescalings,
its kernel `1/γ` and (when every reader has a bias) the shift of `β` into the readers'
biases, the group `{I + c 1ᵀ}` of `groups/_offset.py`: the readers without a bias turn
their rows, `W̃ ↦ W̃ g` in the coordinates `W̃ = W diag(γ)`, while `β / γ ↦ g⁻¹ β / γ`; the
readers with a bias take the change of `W β` back in it. It is `d` more dimensions exactly
where a reader has no bias: with every reader biased, the shift of `β` already moves it
freely, and the factor is not offered.

Conditions (anything else: no factor, and `certify` reports the gap):

- every use of the LayerNorm's output, looked through eval-mode dropouts, identities,
  casts, reshapes that keep the `d` features last and picks of tokens, is a linear map
  reading all `d` features, or a packed `nn.MultiheadAttention` input projection; a residual
  sum or any other operation reads `y` itself, which the offset changes;
- `Σ β / γ` is not negligible (`|Σ β/γ| > 1e-6 Σ |β/γ|`): where it vanishes, `β / γ` no
  longer moves and the tangents reduce to row changes along `1/γ`, and `γ` is well
  conditioned (as for the kernel); values are needed, so none is offered on the meta device;
- rows that feed softmax keys are left alone (a constant on every key changes no softmax),
  the same rows the kernel settles: a reader without a bias by the key rows measured on
  the attention (`settle_offsets`), a biased one where the key bias is left uncompensated,
  and the key rows of an `nn.MultiheadAttention`;
- every other factor that touches the LayerNorm or its readers commutes with the offset, or
  is a rotation of the stream, declared in `moved_by` (`link_offsets`): rescalings of the
  readers' rows and of `γ, β` with the readers' columns, matrix factors and permutations on
  the readers' rows, the same LayerNorm's kernel, shifts of the biased readers' biases.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx, nn

from ..groups import (
    AffineFactor,
    AffineTerm,
    GLFactor,
    MonomialScaleFactor,
    OrthogonalFactor,
    PermutationFactor,
    RescalingFactor,
    Scale,
    TranslationFactor,
)
from ..groups._algebra import AlgebraFactor, unrepeated
from ..groups._offset import LayerNormOffsetFactor, OffsetSlot, OffsetTerm
from ..groups._orthogonal import (
    ConjugatedColumns,
    ConjugatedRow,
    ConjugatedRows,
    RotateColumns,
    RotateRows,
)
from ._attention import _pieces
from ._head_norm_kernel import HeadNormKernelFactor
from ._kernel import LayerNormKernelFactor, ill_conditioned
from ._linear import Linear, keeps_last_axis, linear_reading
from ._offset_layernorm import effective_gain, gain_offset
from ._ops import CASTS, METADATA_OPS, graph_users, is_token_pick, picks_tokens
from ._value_row_shift import ValueRowShiftFactor

__all__ = ["SUM_RATIO", "layernorm_offset", "link_offsets", "offset_factor", "settle_offsets"]

#: `|Σ β/γ| / Σ |β/γ|` at or below which the offset is not offered
SUM_RATIO = 1e-6

aten = torch.ops.aten


def offset_factor(name: str, ln: nn.LayerNorm, slots: list[OffsetSlot]) -> LayerNormOffsetFactor:
    """The offset factor of the LayerNorm `name` (`ln`) with its reader `slots`."""
    E = ln.normalized_shape[0]
    term = OffsetTerm(name, E, ln.weight is not None, tuple(slots), gain_offset(ln))
    mods = tuple(dict.fromkeys((name, *(s.weight.rpartition(".")[0] for s in slots))))
    return LayerNormOffsetFactor(f"ln_offset:{name}", E, terms=(term,), modules=mods)


def _degenerate(ln: nn.LayerNorm) -> bool:
    """No values (meta), an ill-conditioned `γ`, or `Σ β/γ` negligible."""
    gamma = effective_gain(ln)
    if ln.bias.is_meta or ill_conditioned(gamma) is not None:
        return True
    beta = ln.bias.detach().double()
    bt = beta / gamma.double() if gamma is not None else beta
    return not float(bt.sum().abs()) > SUM_RATIO * float(bt.abs().sum())


def _linear_users(prop: Any, node: fx.Node, ndim: int, E: int) -> list | None:
    """`(reader, node it reads)` for every use of `node` (`ndim` axes, `E` features last),
    looking through casts, eval-mode dropouts, identities, reshapes that keep the `E`
    features last and picks of tokens (not features); `None` as soon as a use is anything
    else. A reader is a linear map reading all `E` features (`Linear`), or an
    `nn.MultiheadAttention` module."""
    out: list = []
    for u in graph_users(node):
        if u.op == "call_function" and u.target in METADATA_OPS:
            continue
        found = linear_reading(u, node, prop.root, prop.values)
        if found is not None:
            out.append((found[0], node))
            continue
        if u.op == "call_module":
            mod = prop.root.get_submodule(str(u.target))
            if isinstance(mod, nn.MultiheadAttention):
                out.append((u, node))
                continue
            passes = isinstance(mod, nn.Identity) or (
                isinstance(mod, nn.Dropout) and not mod.training
            )
        else:
            passes = u.op == "call_function" and u.target in CASTS
        first = u.args[:1] == (node,) and node not in u.args[1:] and node not in u.kwargs.values()
        if not first:
            return None
        more: list | None
        if passes:
            more = _linear_users(prop, u, ndim, E)
        elif keeps_last_axis(u, E, prop.values):
            shape = prop.values.get(u)
            k = shape.ndim if isinstance(shape, torch.Tensor) else len(u.args[1])
            more = _linear_users(prop, u, k, E)
        elif is_token_pick(u):
            if not picks_tokens(u, ndim):
                return None
            more = _linear_users(prop, u, ndim - (u.target is aten.select.int), E)
        else:
            return None
        if more is None:
            return None
        out += more
    return out


def layernorm_offset(prop: Any, n: fx.Node, ln: nn.LayerNorm) -> None:
    """Append the offset factor of the LayerNorm node `n` (`ln`) to `prop.L.extra` when its
    output is read by linear maps only, one at least without a bias (module docstring)."""
    if ln.bias is None or len(ln.normalized_shape) != 1 or not n.users or _degenerate(ln):
        return
    E = ln.normalized_shape[0]
    ran = prop.values.get(n)
    if not isinstance(ran, torch.Tensor):
        return
    users = _linear_users(prop, n, ran.ndim, E)
    if not users:
        return
    slots: list[OffsetSlot] = []
    for r, via in users:
        if isinstance(r, Linear):
            rows, cols = r.shape(prop.root)
            if cols != E:
                return
            mode = "right" if r.bias is None else "bias"
            slots.append(OffsetSlot(r.weight, r.bias, 0, rows, r.out_axis, mode))
            continue
        mod = prop.root.get_submodule(str(r.target))
        if not (
            mod._qkv_same_embed_dim
            and mod.embed_dim == E
            and mod.bias_k is None
            and not mod.add_zero_attn  # a zero key, which no constant moves
            and via not in r.args[3:]
            and not any(via is v for v in r.kwargs.values())
        ):
            return
        t, b = str(r.target), mod.in_proj_bias
        for i, a in enumerate(r.args[:3]):
            if a is via and i != 1:  # keys: a constant on every key changes no softmax
                bias = f"{t}.in_proj_bias" if b is not None else None
                mode = "right" if b is None else "bias"
                slots.append(OffsetSlot(f"{t}.in_proj_weight", bias, i * E, (i + 1) * E, 0, mode))
    if any(s.mode == "right" for s in slots):
        prop.L.extra.append(offset_factor(str(n.target), ln, slots))


# -- settling the key rows ----------------------------------------------------------------


def settle_offsets(
    factors: list,
    key_rows: dict[str, list[tuple[int, int]]],
    key_biases: dict[str, list[tuple[int, int]]],
) -> list:
    """Offsets without the reader rows that feed softmax keys, as the kernel settles them:
    rows of a reader without a bias inside `key_rows` (per weight, measured on the
    attention), entries of a bias inside `key_biases` (per bias, where a key shift leaves the
    key bias uncompensated). An offset left with no turning rows is dropped: its readers
    then all have a bias (or feed keys), and the shift of `β` moves it freely."""
    out = []
    for f in factors:
        if not isinstance(f, LayerNormOffsetFactor):
            out.append(f)
            continue
        t = f.offset
        slots: list[OffsetSlot] = []
        for s in t.slots:
            ranges = key_rows.get(s.weight, []) if s.mode == "right" else key_biases.get(s.bias, [])
            slots += [
                dataclasses.replace(s, start=lo, stop=hi)
                for lo, hi, key in _pieces(s.start, s.stop, ranges)
                if not key
            ]
        if any(s.mode == "right" for s in slots):
            term = dataclasses.replace(t, slots=tuple(slots))
            out.append(dataclasses.replace(f, terms=(term,)))
    return out


# -- linking with the rest of the group ---------------------------------------------------


class _Drop(Exception):
    """Another factor transforms the LayerNorm or its readers in a way not covered here."""


def _rows_of(index: torch.Tensor, shape: tuple[int, ...], out_axis: int) -> torch.Tensor:
    """A `Scale` index broadcast to a reader weight, as `(rows, features)`."""
    idx = torch.broadcast_to(index, shape)
    return idx if out_axis == 0 else idx.T


def _check_scales(f: Any, t: OffsetTerm, shapes: dict[str, tuple[int, ...]]) -> None:
    """A rescaling commutes with the offset when, in the coordinates `W̃ = W diag(γ)`,
    `β / γ`, it only scales rows: it scales `γ` and `β` alike (or neither), every reader's
    columns against `γ` where it scales `γ`, and the rows of a reader with a bias as that
    bias."""
    terms = [x for x in f.terms if getattr(x, "param", None) in set(t.touched())]
    if any(not isinstance(x, Scale) for x in f.terms if set(_params(x)) & set(t.touched())):
        raise _Drop
    by = {x.param: x for x in terms}
    gamma, beta = f"{t.ln}.weight", f"{t.ln}.bias"
    g_idx = None
    if gamma in by or beta in by:
        if not t.weight or gamma not in by or beta not in by:
            raise _Drop
        a, b = by[gamma], by[beta]
        ga = torch.broadcast_to(a.index, (t.features,))
        if a.power != b.power or not torch.equal(ga, torch.broadcast_to(b.index, (t.features,))):
            raise _Drop
        g_idx, g_pow = ga, a.power
    for s in t.slots:
        rows_scale = None
        cancelled = g_idx is None
        for x in (x for x in terms if x.param == s.weight):
            idx = _rows_of(x.index, shapes[s.weight], s.out_axis)[s.start : s.stop]
            if bool((idx == idx[:, :1]).all()):
                if rows_scale is not None:
                    raise _Drop
                rows_scale = (idx[:, 0], x.power)
            elif g_idx is not None and x.power == -g_pow and bool((idx == g_idx[None]).all()):
                cancelled = True
            else:
                raise _Drop
        if not cancelled:
            raise _Drop
        if s.mode == "bias":
            bias = [x for x in terms if x.param == s.bias]
            if len(bias) > 1 or (bool(bias) != (rows_scale is not None)):
                raise _Drop
            if bias:
                bi = torch.broadcast_to(bias[0].index.reshape(-1), shapes[str(s.bias)])
                idx, p = rows_scale
                if bias[0].power != p or not torch.equal(bi[s.start : s.stop], idx):
                    raise _Drop


def _params(term: Any) -> tuple[str, ...]:
    if hasattr(term, "touched"):
        return tuple(term.touched())
    out = [getattr(term, a) for a in ("param", "weight", "bias", "gain") if hasattr(term, a)]
    return tuple(p for p in out if isinstance(p, str))


def _check_rows(f: Any, t: OffsetTerm, shapes: dict[str, tuple[int, ...]]) -> None:
    """Matrix factors (`GL`, subalgebras, affine) act on the readers' rows only."""
    ln = {f"{t.ln}.weight", f"{t.ln}.bias"}
    for term in f.terms:
        if isinstance(term, AffineTerm):
            mine = [s for s in t.slots if s.weight == term.weight]
            if term.weight in ln or (term.bias in ln):
                raise _Drop
            biases = {s.bias for s in t.slots if s.mode == "bias"}
            if not mine and term.bias not in biases:
                continue
            rows = shapes[term.weight][0]
            whole = len(mine) == 1 and mine[0].start == 0 and mine[0].stop == rows
            if term.side != "left" or not whole or mine[0].out_axis != 0:
                raise _Drop
            continue
        inner, times = unrepeated(term)
        p = getattr(inner, "param", None)
        if p in ln:
            raise _Drop
        weights = [s for s in t.slots if s.weight == p]
        biases = [s for s in t.slots if s.mode == "bias" and s.bias == p]
        if not weights and not biases:
            continue
        if not isinstance(f, (GLFactor, AlgebraFactor)):
            raise _Drop
        axis = weights[0].out_axis if weights else 0
        if inner.axis != axis:
            raise _Drop
        held = [(s.start, s.stop) for s in weights or biases]
        _blocks_keep(f, inner.index(f.b * times, f.d), held)


def _held(ranges: list[tuple[int, int]], rows: torch.Tensor) -> torch.Tensor:
    """Which of `rows` (any shape) lie in one of `ranges`."""
    out = torch.zeros(rows.shape, dtype=torch.bool)
    for a, b in ranges:
        out |= (rows >= a) & (rows < b)
    return out


def _blocks_keep(f: Any, index: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """The `d × d` blocks of `f` (on the rows `index`, `(blocks, d)`) map the rows the
    slots hold to themselves: each block's rows all held, none held, or (an algebra whose
    basis keeps the held coordinates and the others apart, as the query-key commutant under
    partial rotary keeps the unrotated and the rotated ones) split compatibly; else
    `_Drop`."""
    for rows in index:
        mask = _held(ranges, rows)
        if bool(mask.all()) or not bool(mask.any()):
            continue
        if not (isinstance(f, AlgebraFactor) and f.keeps_apart(mask)):
            raise _Drop


def _check_perm(f: PermutationFactor, t: OffsetTerm) -> None:
    """Permutations move readers' rows only, each item's rows inside one slot or none."""
    ln = {f"{t.ln}.weight", f"{t.ln}.bias"}
    for term in f.terms:
        if term.param in ln:
            raise _Drop
        weights = [s for s in t.slots if s.weight == term.param]
        biases = [s for s in t.slots if s.mode == "bias" and s.bias == term.param]
        if not weights and not biases:
            continue
        axis = weights[0].out_axis if weights else 0
        if term.axis != axis:
            raise _Drop
        # the held rows go to held rows: the same pattern in every item
        mask = _held([(s.start, s.stop) for s in weights or biases], term.entries)
        if not bool((mask == mask[:1]).all()):
            raise _Drop


def _rotation(f: OrthogonalFactor, t: OffsetTerm) -> tuple:
    """The `moved_by` declaration of a stream rotation that turns the LayerNorm's `β` and
    every reader's input axis (conjugated by `γ`), keeping `1`."""
    gain = f"{t.ln}.weight" if t.weight else None
    by = {x.param: x for x in f.terms}
    beta = by.get(f"{t.ln}.bias")
    ok_beta = (
        isinstance(beta, ConjugatedRow) and beta.gain == gain
        if gain
        else isinstance(beta, RotateColumns)
    )
    if not f.fixes_ones or not ok_beta:
        raise _Drop
    for s in t.slots:
        x = by.get(s.weight)
        if gain:
            want = ConjugatedColumns if s.out_axis == 0 else ConjugatedRows
            ok = isinstance(x, want) and x.gain == gain
        else:
            ok = isinstance(x, RotateColumns if s.out_axis == 0 else RotateRows)
        if not ok:
            raise _Drop
    return (f.name, "T")


def _link_one(
    f: LayerNormOffsetFactor, factors: list, shapes: dict[str, tuple[int, ...]]
) -> LayerNormOffsetFactor | None:
    t = f.offset
    mine = set(f.params())
    biases = {s.bias for s in t.slots if s.mode == "bias"}
    moved = []
    try:
        for g in factors:
            if g is f or not mine & set(g.params()):
                continue
            if isinstance(g, LayerNormKernelFactor):
                # its rows: biased ones (both take `W β` back alike) or key rows (which the
                # offset leaves alone); it reads `β, γ` in the same coordinates
                if g.kernel.ln != t.ln:
                    raise _Drop
                continue
            if isinstance(g, (HeadNormKernelFactor, ValueRowShiftFactor)):
                continue  # checked to commute with every factor on its parameters
            if isinstance(g, TranslationFactor):
                if not (mine & set(g.params())) <= biases:
                    raise _Drop
                continue
            if isinstance(g, (RescalingFactor, MonomialScaleFactor)):
                _check_scales(g, t, shapes)
            elif isinstance(g, PermutationFactor):
                _check_perm(g, t)
            elif isinstance(g, (GLFactor, AlgebraFactor, AffineFactor)):
                _check_rows(g, t, shapes)
            elif isinstance(g, OrthogonalFactor):
                moved.append(_rotation(g, t))
            else:
                raise _Drop
    except _Drop:
        return None
    return dataclasses.replace(f, moved_by=tuple(moved))


def link_offsets(factors: list, model: nn.Module) -> list:
    """`factors` with every `LayerNormOffsetFactor` linked to the rest of the group (the
    rotations it does not commute with declared in `moved_by`), or left out where another
    factor transforms its LayerNorm or readers in a way not covered (module docstring)."""
    if not any(isinstance(f, LayerNormOffsetFactor) for f in factors):
        return factors
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters(remove_duplicate=False)}
    out = []
    for f in factors:
        if isinstance(f, LayerNormOffsetFactor):
            f = _link_one(f, factors, shapes)
            if f is None:
                continue
        out.append(f)
    return out
