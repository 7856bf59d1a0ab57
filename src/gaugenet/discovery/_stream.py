"""Residual streams found in the graph, and their orthogonal symmetry.

Starting from each embedding lookup, and from each linear map's output (a stream with no
table: `Linear → norm → Linear`; or one part of such an output split along its features, whose
block of rows alone turns), the stream is followed through the graph: casts keep
it, as does a product with one constant number (Gemma's `√d`); a residual sum with the
output of a linear map (that nothing else reads) extends it and records that map as a
writer (`nn.Linear`, or an `addmm` with an `(in, d)` weight as GPT-2's
`Conv1D`, whose columns turn; or another embedding table, a position table added to the
tokens'), and normalizations read it: an RMS normalization `x · rsqrt(mean(x²) + ε)` (the
per-token factor computed from the stream alone), then a per-feature gain `γ`, whose product
only linear maps read; or an `nn.LayerNorm` over the features whose output only linear maps
read. A LayerNorm subtracts the mean, so the rotation must keep `1` (the subgroup
`O(d − 1)`); its readers take `γ` conjugated as after RMSNorm, and its `β` becomes
`β diag(γ)⁻¹ Q diag(γ)`. Readers are found through casts and reshapes that keep the
features last (an `addmm` reader's `(d, m)` weight turns by its rows). A linear map may
also read the stream as it is, with no normalization between: it turns as an unnormalized
reader. A stream from an embedding table that only such maps read (no normalization at all)
keeps the whole `GL(d)` (`_stream_gl.py`), with the shifts of what its tables and writers
write. A
tensor both turned as a table and read (a tied head, under any name) gets no rotation. Any
other use (the model's output, a nonlinearity) means the stream's basis is seen, and no
rotation is claimed.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx, nn

from ..groups import PermutationFactor
from ..groups._orthogonal import (
    ConjugatedColumns,
    ConjugatedRow,
    ConjugatedRows,
    OrthogonalFactor,
    RotateBlock,
    RotateColumns,
    RotateRows,
)
from ._embeddings import TableShiftFactor
from ._linear import Linear, keeps_last_axis, linear_reading, linear_writing, param_name
from ._offset_gain import offset_gain
from ._offset_layernorm import gain_offset
from ._ops import (
    ADDITIONS,
    CAST_METHODS,
    CASTS,
    DTYPE_CASTS,
    METADATA_OPS,
    graph_users,
    is_cast,
    passes_input,
)
from ._scaled import scaled_by_constant
from ._shifts import AbsorbedShiftFactor, GainIntoLinears, IntoLinears
from ._stream_gl import StreamGLFactor, stream_gl
from ._unread import _ancestors
from .rules.recurrent import BiasDifferenceFactor

__all__ = ["stream_rotations", "with_rotations"]

aten = torch.ops.aten
_ADD = ADDITIONS
_MUL = {torch.mul, operator.mul, aten.mul.Tensor}
_NORM_OPS = {aten.pow.Tensor_Scalar, torch.mean, aten.mean.dim, aten.rsqrt.default, *_ADD}
#: the same as `torch.fx` records them from a norm written out in a module (`x.pow(2)`,
#: `.mean(-1, keepdim=True)`, `torch.rsqrt`, `x * x`)
_POW = {aten.pow.Tensor_Scalar, torch.pow, operator.pow}
_NORM_FUNCS = {*_POW, torch.rsqrt, *_MUL}
_NORM_METHODS = {"pow", "mean", "rsqrt"}


#: tensor attributes that say nothing about the values
_META_ATTRS = {"dtype", "shape", "device", "ndim"}
_SLICES = {operator.getitem, aten.slice.Tensor}


class _NotAStream(Exception):
    pass


def stream_rotations(gm: fx.GraphModule, root: nn.Module, values: dict[fx.Node, Any]) -> list:
    """One `OrthogonalFactor` per residual stream that admits it: streams that start at an
    embedding lookup, and streams that start at the output of a linear map (`Linear → norm →
    Linear`, with no table at all)."""
    out = []
    for n in gm.graph.nodes:
        seed = _seed(n, root, values)
        if seed is None:
            continue
        try:
            f = _follow(n, seed, root, values)
        except _NotAStream:
            continue
        if f is not None:
            out.append(f)
    return out


@dataclasses.dataclass(frozen=True)
class _Seed:
    """Where a stream starts: the parameter whose feature axis (`axis`, of size `d`) the
    rotation turns first (an embedding table's columns, a linear map's output rows), and
    its terms (with the map's bias)."""

    name: str
    param: str
    axis: int
    d: int
    terms: tuple
    #: the entries of `param` along `axis` that start the stream (`None`: all)
    block: tuple[int, int] | None = None


def _seed(n: fx.Node, root: nn.Module, values: dict) -> _Seed | None:
    m = _module(root, n)
    if isinstance(m, nn.Embedding):
        table = f"{n.target}.weight"
        return _Seed(str(n.target), table, 1, m.embedding_dim, (RotateColumns(table),))
    matmul = n.op == "call_function" and n.target in (aten.addmm.default, aten.mm.default)
    if matmul and any(linear_writing(u, root, values) is not None for u in n.users):
        return None  # seeded at the reshape back to tokens
    part = _split_part(n, root, values)
    if part is not None:
        return part
    lin = linear_writing(n, root, values)
    if lin is None:
        return None
    d = lin.shape(root)[0]
    terms = [_writer_term(lin)]
    if lin.bias is not None:
        terms.append(RotateRows(lin.bias))
    return _Seed(lin.name, lin.weight, lin.out_axis, d, tuple(terms))


def _split_part(n: fx.Node, root: nn.Module, values: dict) -> _Seed | None:
    """`n` is part `i` of a linear map's output split along its features (`torch.split`,
    which alone reads the output; no other node takes part `i`): a stream starting at that
    block of the map's output rows (DeepSeek's compressed keys and values, split from the
    rotary key part)."""
    if not (n.op == "call_function" and n.target is operator.getitem):
        return None
    split, i = n.args
    if not (isinstance(split, fx.Node) and split.op == "call_function"):
        return None
    if split.target is not torch.split or not isinstance(i, int):
        return None
    src, size, *rest = split.args
    dim = rest[0] if rest else split.kwargs.get("dim", 0)
    lin = linear_writing(src, root, values)
    v = values.get(src)
    if lin is None or not isinstance(v, torch.Tensor) or graph_users(src) != [split]:
        return None
    if dim not in (-1, v.ndim - 1):
        return None
    total = v.shape[-1]
    sizes = list(size) if isinstance(size, (list, tuple)) else [size] * -(-total // size)
    sizes[-1] = total - sum(sizes[:-1])
    if not 0 <= i < len(sizes) or [u.args[1] for u in split.users].count(i) != 1:
        return None
    start = sum(sizes[:i])
    stop = start + sizes[i]
    terms = [RotateBlock(lin.weight, lin.out_axis, start, stop)]
    if lin.bias is not None:
        terms.append(RotateBlock(lin.bias, 0, start, stop))
    name = f"{lin.name}[{start}:{stop}]"
    return _Seed(name, lin.weight, lin.out_axis, sizes[i], tuple(terms), (start, stop))


def _writer_term(w: Linear) -> Any:
    """`(d, in)` as `nn.Linear`'s: rows; `(in, d)` as an `addmm`'s: columns."""
    return RotateRows(w.weight) if w.out_axis == 0 else RotateColumns(w.weight)


def with_rotations(factors: list, rotations: list[OrthogonalFactor]) -> list:
    """`factors` plus `rotations`, without the permutations of the rotated streams (they are
    rotations too, and would not compose with the orthogonal element by reindexing)."""
    if not rotations:
        return factors
    # A LayerNorm's `β` moved into its readers' biases (a shift factor) does not commute
    # with the rotation, which conjugates `β` by `γ` (the shift would have to be carried
    # past it, through `γ`): such a stream keeps its shifts and permutations instead.
    unique: dict[frozenset, OrthogonalFactor] = {}
    for r in rotations:  # one stream reached from each of its tables: once
        unique.setdefault(frozenset(t.param for t in r.terms), r)
    rotations = list(unique.values())
    # a vector moved between two rotated tables turns with them (`v ↦ Bᵀ Qᵀ B v`), and a
    # LayerNorm's shift into its readers' biases, written as `γ ⊙ u`, by `u ↦ Qᵀ u`
    factors = [_moved_by_rotation(f, rotations, factors) for f in factors]
    # (a stream holding a block of its writer's outputs keeps the writer's permutations:
    # they may move other entries too)
    tables = {(r.table, r.table_axis) for r in rotations if r.table_block is None}
    kept = [
        f
        for f in factors
        if not (
            isinstance(f, PermutationFactor) and any((t.param, t.axis) in tables for t in f.terms)
        )
    ]
    return kept + rotations + [m for r in rotations for m in getattr(r, "moves", ())]


def _module(root: nn.Module, n: Any) -> nn.Module | None:
    if isinstance(n, fx.Node) and n.op == "call_module":
        return root.get_submodule(str(n.target))
    return None


def _follow(
    start: fx.Node, seed: _Seed, root: nn.Module, values: dict[fx.Node, Any]
) -> OrthogonalFactor | StreamGLFactor | None:
    d = seed.d
    stream, frontier = {start}, [start]
    writers: list[Linear] = []
    tables: list[str] = []
    readers: list = []  # reader terms
    direct: list[Linear] = []  # linear maps reading the stream with no norm between
    read_at: list[fx.Node] = []  # the stream node each of them reads
    table_nodes: list[fx.Node] = []  # the lookups of the added tables
    raw_tables: set[str] = set()  # added tables that are parameters read as they are
    centered = False  # read through a LayerNorm: the rotation must keep `1`
    while frontier:
        n = frontier.pop()
        for u in list(n.users):
            if u in stream or (u.op == "call_function" and u.target in METADATA_OPS):
                continue
            if u.op == "call_function" and u.target is getattr and u.args[1] in _META_ATTRS:
                continue  # `x.dtype`, `x.shape`: reads no value
            if _cast_to(u) and u.args[0] is not n:
                continue  # `y.type_as(x)`: reads `x`'s dtype only
            if u.op == "output":
                raise _NotAStream(u.name)
            if _cast_of(u, n) or passes_input(u, root) or scaled_by_constant(u, n, root, values):
                stream.add(u)
                frontier.append(u)
            elif u.op == "call_function" and u.target in _ADD:
                other = u.args[1] if u.args[0] is n else u.args[0]
                other = _before_casts(other)
                m = _module(root, other)
                found = None if other in stream else _writers(other, root, d)
                if other in stream:
                    pass
                elif found is not None:
                    writers += found
                elif _added_table(other, m, d):  # a position table added to the tokens'
                    tables.append(f"{other.target}.weight")
                    table_nodes.append(other)
                    stream.add(other)
                elif (raw := _added_param(other, root, values, d)) is not None:
                    tables.append(raw)  # a parameter added as it is (`+ self.pos[:n]`)
                    raw_tables.add(raw)
                    table_nodes.append(other)
                    stream.add(other)
                else:
                    raise _NotAStream(u.name)
                stream.add(u)
                frontier.append(u)
            elif (
                u.op == "call_module"
                and isinstance(_module(root, u), nn.LayerNorm)
                and u.args[0] is n
            ):
                readers += _layernorm_readers(u, root, d)
                centered = True
            elif _square(u, n):
                continue  # the square an RMS normalization averages (`_from_norm`)
            elif u.op == "call_function" and u.target in _MUL:
                readers += _rms_readers(u, n, root, d)
            else:
                found = linear_reading(u, n, root, values)
                if found is None or found[0].shape(root)[1] != d:
                    raise _NotAStream(u.name)
                direct.append(found[0])  # a linear map reading the stream as it is
                read_at.append(n)
    if not readers:
        if direct and _table_seed(seed, root):  # no normalization: the whole `GL(d)`
            reach = _reaching(read_at, [start, *table_nodes], writers)
            return _gl(seed, tables, writers, direct, root, reach)
        return None
    if raw_tables:
        return None  # (the rotation's terms are written for `(rows, d)` tables)
    readers += [_reader_term(lin, None) for lin in direct]  # turned as unnormalized readers
    terms: list = [*seed.terms, *(RotateColumns(t) for t in tables)]
    for w in writers:
        terms.append(_writer_term(w))
        if w.bias is not None:
            terms.append(RotateRows(w.bias))
    terms += readers
    touched = [t.param for t in terms]
    if _tied(touched, root):
        return None
    mods = tuple(dict.fromkeys(p.rpartition(".")[0] for p in touched))
    return OrthogonalFactor(
        f"rotation:{seed.name}",
        d,
        terms=tuple(terms),
        modules=mods,
        table=seed.param,
        table_axis=seed.axis,
        table_block=seed.block,
        fixes_ones=centered,
    )


def _tied(params: list[str], root: nn.Module) -> bool:
    """Two of the parameters a stream factor acts on are one tensor: a tied table read and
    written (under one name or two, as a tied LM head), where the two actions disagree."""
    return len({id(root.get_parameter(p)) for p in params}) != len(params)


def _table_seed(seed: _Seed, root: nn.Module) -> bool:
    """The stream starts at a whole embedding table (not at a linear map's output, whose
    `GL` with a reader is the linear layers' own)."""
    owner = root.get_submodule(seed.param.rpartition(".")[0])
    return isinstance(owner, nn.Embedding) and seed.block is None and seed.axis == 1


def _reaching(
    read_at: list[fx.Node], tables: list[fx.Node], writers: list[Linear]
) -> list[tuple[bool, ...]]:
    """For each reader (the stream node it reads), which contributors reach it: the tables
    (the seed's lookup first), then the writers, in order; a contributor reaches a reader
    when its node is that stream node or one of its ancestors."""
    sources = [*tables, *(w.node for w in writers)]
    graph = set(read_at[0].graph.nodes) if read_at else set()
    out = []
    for n in read_at:
        seen = _ancestors(n, graph) | {n}
        out.append(tuple(src in seen for src in sources))
    return out


def _gl(
    seed: _Seed,
    tables: list[str],
    writers: list[Linear],
    readers: list[Linear],
    root: nn.Module,
    reach: list[tuple[bool, ...]],
) -> StreamGLFactor | None:
    params = [seed.param, *tables]
    params += [p for w in writers for p in (w.weight, w.bias) if p is not None]
    params += [r.weight for r in readers]
    if _tied(params, root):
        return None
    mods = tuple(dict.fromkeys(p.rpartition(".")[0] or p for p in params))
    axes = {t: root.get_parameter(t).ndim - 1 for t in tables}
    return stream_gl(seed.name, seed.d, seed.param, tables, writers, readers, mods, reach, axes)


def _moved_by_rotation(f: Any, rotations: list[OrthogonalFactor], factors: list) -> Any:
    """`f` with the rotation declared in `moved_by` where it does not commute with it: a
    vector moved between two embedding tables that one rotation turns (a
    `TableShiftFactor`), or the shift of a LayerNorm's `β` that the rotation conjugates
    (rewritten as `γ ⊙ u`, which also commutes with the LayerNorm's rescaling)."""
    if isinstance(f, TableShiftFactor):
        for r in rotations:
            turned = {t.param for t in r.terms if isinstance(t, RotateColumns)}
            if r.fixes_ones and set(f.params()) <= turned:
                return dataclasses.replace(f, moved_by=(*f.moved_by, (r.name, "Tc")))
        return f
    if isinstance(f, BiasDifferenceFactor):  # a bias moved between two rotated writers
        for r in rotations:
            rows = {t.param for t in r.terms if isinstance(t, RotateRows)}
            if {f.terms[0].into, f.terms[0].out_of} <= rows:
                return dataclasses.replace(f, moved_by=(*f.moved_by, (r.name, "T")))
        return f
    if not isinstance(f, AbsorbedShiftFactor) or len(f.terms) != 1:
        return f
    t = f.terms[0]
    if type(t) is not IntoLinears or t.residual:
        return f
    for r in rotations:
        row = next(
            (c for c in r.terms if isinstance(c, ConjugatedRow) and c.param == t.param), None
        )
        if row is None:
            continue
        gain = row.gain
        term = GainIntoLinears(
            t.param, t.consumers, t.residual, t.transposed, t.pending, gain, row.offset
        )
        scales_gain = {g.name for g in factors if gain in g.params()}
        return dataclasses.replace(
            f,
            terms=(term,),
            scaled_by=tuple(e for e in f.scaled_by if e[0] not in scales_gain),
            moved_by=(*f.moved_by, (r.name, "T")),
        )
    return f


def _writers(n: Any, root: nn.Module, d: int) -> list[Linear] | None:
    """The linear maps whose outputs (each read only here) sum to `n`, through dropout and
    sums (a parallel block's `attention + MLP`); `None` if `n` is anything else. A map is an
    `nn.Linear` or an `addmm` on parameters whose output is viewed back to tokens (GPT-2's
    `Conv1D`, weight `(in, d)`)."""
    if not isinstance(n, fx.Node) or len(n.users) != 1:
        return None
    if passes_input(n, root):
        return _writers(n.args[0], root, d)
    lin = linear_writing(n, root)
    if lin is not None:
        return [lin] if lin.shape(root)[0] == d else None
    if n.op == "call_function" and n.target in _ADD and len(n.args) == 2 and not n.kwargs:
        parts = [_writers(a, root, d) for a in n.args]
        return None if any(p is None for p in parts) else [w for p in parts for w in p]
    return None


def _added_table(other: Any, m: nn.Module | None, d: int) -> bool:
    """`other` is the lookup of another embedding table of width `d` that only this sum
    reads (GPT-2's and OPT's positions)."""
    return isinstance(m, nn.Embedding) and m.embedding_dim == d and len(graph_users(other)) == 1


def _added_param(other: Any, root: nn.Module, values: dict, d: int) -> str | None:
    """The parameter `other` reads when it is a parameter with `d` features last, or a
    slice of one that keeps them (`self.pos[:, :n]`), read only by this sum; else `None`."""
    if not isinstance(other, fx.Node) or len(graph_users(other)) != 1:
        return None
    src = other
    if other.op == "call_function" and other.target in _SLICES and other.args:
        src = other.args[0]
        if not (isinstance(src, fx.Node) and len(graph_users(src)) == 1):
            return None
    name = param_name(src, root)
    if name is None:
        return None
    p, v = root.get_parameter(name), values.get(other)
    if p.ndim < 2 or p.shape[-1] != d or not isinstance(v, torch.Tensor) or v.shape[-1] != d:
        return None
    if src is not other and not _keeps_last(other, p.ndim):
        return None
    return name


def _keeps_last(n: fx.Node, ndim: int) -> bool:
    """The slice `n` leaves the last axis whole."""
    if n.target is operator.getitem:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if any(i is Ellipsis or i is None for i in idx):
            return False
        return len(idx) < ndim or idx[-1] == slice(None)
    dim = n.args[1] if len(n.args) > 1 else 0  # aten.slice.Tensor(p, dim, start, end)
    return isinstance(dim, int) and dim % ndim != ndim - 1


def _layernorm_readers(ln: fx.Node, root: nn.Module, d: int) -> list:
    """A LayerNorm over the `d` features whose output only linear maps read: their terms
    (columns conjugated by `γ`, or rotated when it has none) and `β`'s."""
    m = root.get_submodule(str(ln.target))
    if tuple(m.normalized_shape) != (d,):
        raise _NotAStream(ln.name)
    name = str(ln.target)
    gain = f"{name}.weight" if m.weight is not None else None
    off = gain_offset(m)  # `γ = w + c` for a gain stored with an offset
    out: list = []
    if m.bias is not None:
        bias = f"{name}.bias"
        out.append(ConjugatedRow(bias, gain, off) if gain else RotateColumns(bias))
    y = _skip_casts(ln)
    out += [_reader_term(lin, gain, off) for lin in _linear_readers(y, root, d)]
    return out


def _linear_readers(y: fx.Node, root: nn.Module, d: int) -> list[Linear]:
    """The linear maps that are all of `y`'s readers (`nn.Linear`, or an `addmm` on a view
    of `y` with the features kept last), through casts and reshapes that keep the `d`
    features last (reads of its shape or dtype aside); or `_NotAStream`."""
    out = []
    for u in graph_users(y):
        if u.op == "call_function" and u.target is getattr and u.args[1] in _META_ATTRS:
            continue  # `y.shape`: reads no value
        found = linear_reading(u, y, root)
        if found is not None:
            out.append(found[0])
        elif u.args[0] is y and (_cast_of(u, y) or keeps_last_axis(u, d)):
            out += _linear_readers(u, root, d)
        else:
            raise _NotAStream(u.name)
    return out


def _reader_term(lin: Linear, gain: str | None, offset: float = 0.0) -> Any:
    """The term of a reader of the normalized stream: its input axis turned by `Q`,
    conjugated by the gain `γ` when there is one (by `γ + offset` for a gain stored with
    an offset, see `_offset_gain.py`)."""
    if lin.out_axis == 0:  # `(m, d)`: columns
        return ConjugatedColumns(lin.weight, gain, offset) if gain else RotateColumns(lin.weight)
    return ConjugatedRows(lin.weight, gain, offset) if gain else RotateRows(lin.weight)


def _rms_readers(mul: fx.Node, x: fx.Node, root: nn.Module, d: int) -> list:
    """`x · r` with `r = rsqrt(mean(x²) + ε)` computed from `x` alone, then `γ ·`, then only
    linear maps: their terms (columns conjugated by `γ`)."""
    r = mul.args[1] if mul.args[0] is x else mul.args[0]
    if not _from_norm(r, x):
        raise _NotAStream
    n = _skip_casts(mul)
    users = graph_users(n)
    gains = [u for u in users if u.op == "call_function" and u.target in _MUL]
    if len(users) != 1 or len(gains) != 1:
        raise _NotAStream(n.name)
    g = gains[0]
    gain, offset = param_name(g.args[0], root) or param_name(g.args[1], root), 0.0
    if gain is None:  # `x̂ · (w + c)`: the gain stored with an offset
        og = offset_gain(g.args[1] if g.args[0] is n else g.args[0], root)
        gain, offset = (og.param, og.offset) if og is not None else (None, 0.0)
    if gain is None or root.get_parameter(gain).shape != (d,):
        raise _NotAStream
    g = _skip_casts(g)
    return [_reader_term(lin, gain, offset) for lin in _linear_readers(g, root, d)]


def _before_casts(n: Any) -> Any:
    """`n` with the casts that only it reads peeled off (a position table cast to the
    tokens' dtype before the sum)."""
    while (
        isinstance(n, fx.Node)
        and n.op == "call_function"
        and n.target in CASTS
        and len(graph_users(n)) == 1
    ):
        n = n.args[0]
    return n


def _skip_casts(n: fx.Node) -> fx.Node:
    while len(graph_users(n)) == 1:
        (u,) = graph_users(n)
        if _cast_of(u, n):
            n = u
        else:
            break
    return n


def _cast_to(u: fx.Node) -> bool:
    return u.op == "call_function" and u.target in DTYPE_CASTS


def _cast_of(u: fx.Node, n: fx.Node) -> bool:
    """`u` casts `n` (a plain cast, or `n.type_as(other)`)."""
    plain = u.op == "call_function" and u.target in CASTS
    return plain or (_cast_to(u) and u.args[0] is n)


def _square(u: fx.Node, x: fx.Node) -> bool:
    """`u` is `x²`: `x.pow(2)`, `torch.pow(x, 2)`, `x ** 2` or `x * x`."""
    if u.op == "call_function" and u.target in _MUL:
        return len(u.args) == 2 and u.args[0] is x and u.args[1] is x
    pow_ = u.op == "call_method" and u.target == "pow"
    pow_ = pow_ or (u.op == "call_function" and u.target in _POW)
    return pow_ and len(u.args) == 2 and u.args[0] is x and u.args[1] == 2


def _from_norm(r: Any, x: fx.Node) -> bool:
    """`r` is computed from `x` only, by the operations of an RMS normalization."""
    stack, seen = [r], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n is x:
            continue
        if n.op == "call_method":
            if n.target not in _NORM_METHODS and n.target not in CAST_METHODS:
                return False
        elif n.op != "call_function" or n.target not in _NORM_OPS | _NORM_FUNCS | CASTS:
            return False
        stack += list(n.all_input_nodes)
    if x not in seen:
        return False
    # `x` (or a cast of it) enters only squared: `r` is a function of `|x|²`, which a
    # rotation keeps (`mean(x)` would not be)
    xs = {x}
    for n in x.graph.nodes:
        if n in seen and n is not x and is_cast(n) and n.args[0] in xs:
            xs.add(n)
    for n in seen - xs:
        for a in n.all_input_nodes:
            if a in xs and not _square(n, a):
                return False
    return True
