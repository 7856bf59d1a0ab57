"""Linear residual streams of convolutional networks: their `GL(c)` and their shifts.

A stream is a connected set of residual sums (additions whose operands are other additions
of the set or the outputs of *writers*) together with those writers' outputs. A writer is a
convolution (`groups = 1`) followed only by eval-mode affine BatchNorm, or a convolution with
a bias. A *reader* is a convolution (`groups = 1`) taking a stream tensor as its input; it
*absorbs a shift* when it is 1×1 without padding and has a bias, or is followed only by
eval-mode affine BatchNorm.

- `GL(c)` (`LinearStreamFactor`): when every operand of every sum is a writer or a sum, and
  every use of a stream tensor is a sum of the stream or a reader (MobileNetV2's linear
  bottlenecks: 1×1 projections with BatchNorm and no activation, read by the next blocks'
  1×1 expansions). It contains the stream's channel rescalings and permutations, which are
  fixed in the labels before the factors are built (`fix_stream_labels`).
- Shifts of the writers' biases (`StreamShiftFactor`, `R^c` each): `b_w ↦ b_w + k_w v`
  changes each stream tensor by `v` times the sum of `k_w` over the writers reaching it.
  Readers that absorb a shift take it back (their bias, or their BatchNorm's `β` times
  `γ / σ`, `↦ − k V v`, computed from the state acted on); every other use of a tensor (a
  nonlinearity, the output, a padded reader) must see no change. One factor per vector
  `k` of an exact basis of those constraints: each writer alone where all it reaches is
  absorbed (MobileNetV2), the two BatchNorm shifts of a ResNet projection block opposite
  (their sum feeds a ReLU). A foreign operand (a ReLU6 output summed into the stream) does
  not prevent them. Each declares the stream's `GL` (`moved_by`), the rescalings of its
  first writer's bias (`scaled_by`) and their permutations (`conjugates`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor, fx, nn

from ..groups import TranslationFactor
from ..groups._base import State
from ..groups._linear_stream import ConjugatedRows, LinearStreamFactor
from ..groups._matrix import MatTerm
from ._ops import graph_users
from ._summed_biases import with_moves

__all__ = ["LinearStream", "fix_stream_labels", "linear_streams", "stream_factors"]

_ADD = {torch.add, operator.add, operator.iadd, torch.ops.aten.add.Tensor}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class LinearStream:
    """One stream: its sums, its writers' output nodes (`writers[node] = (conv, bn or None)`),
    its readers (`(node read, conv name)`), and whether it admits `GL(c)`."""

    sums: list[fx.Node]
    writers: dict[fx.Node, tuple[str, str | None]]
    readers: list[tuple[fx.Node, str]]
    c: int
    gl: bool
    #: shifts: per basis vector, a coefficient per writer output node (see `_shift_basis`)
    shifts: list[dict[fx.Node, Fraction]] = field(default_factory=list)


def _is_add(n: object) -> bool:
    return (
        isinstance(n, fx.Node)
        and n.op == "call_function"
        and n.target in _ADD
        and not n.kwargs
        and len(n.args) == 2
        and all(isinstance(a, fx.Node) for a in n.args)
    )


def _module(root: nn.Module, n: object) -> nn.Module | None:
    if isinstance(n, fx.Node) and n.op == "call_module":
        return root.get_submodule(str(n.target))
    return None


def _conv(m: object) -> bool:
    return (
        isinstance(m, nn.modules.conv._ConvNd)
        and not isinstance(m, nn.modules.conv._ConvTransposeNd)
        and m.groups == 1
    )


def _eval_bn(m: object) -> bool:
    return isinstance(m, _BN) and m.affine and m.track_running_stats and not m.training


def _writer(n: fx.Node, root: nn.Module) -> tuple[str, str | None] | None:
    m = _module(root, n)
    if _eval_bn(m):
        src = n.args[0]
        conv = _module(root, src)
        if _conv(conv) and conv.bias is None and len(graph_users(src)) == 1:
            return str(src.target), str(n.target)
        return None
    if _conv(m) and m.bias is not None:
        return str(n.target), None
    return None


def _absorbs(u: fx.Node, root: nn.Module) -> bool:
    """Whether the reader `u` (a convolution) takes a constant shift of its input back."""
    m = root.get_submodule(str(u.target))
    one = all(k == 1 for k in m.kernel_size) and (
        m.padding == "valid" or all(p == 0 for p in m.padding)
    )
    if not one:
        return False
    if m.bias is not None:
        return True
    users = graph_users(u)
    return len(users) == 1 and _eval_bn(_module(root, users[0]))


def linear_streams(gm: fx.GraphModule, root: nn.Module, values: dict) -> list[LinearStream]:
    """Every stream of `gm` with at least one writer (see the module docstring)."""
    adds = [n for n in gm.graph.nodes if _is_add(n)]
    comp: dict[fx.Node, int] = {}
    parent = list(range(len(adds)))
    index = {n: i for i, n in enumerate(adds)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for n in adds:
        for a in n.args:
            if a in index:
                parent[find(index[a])] = find(index[n])
    for n in adds:
        comp[n] = find(index[n])
    out = []
    for k in sorted(set(comp.values())):
        sums = [n for n in adds if comp[n] == k]
        s = _stream(sums, root, values)
        if s is not None:
            out.append(s)
    return out


def _stream(sums: list[fx.Node], root: nn.Module, values: dict) -> LinearStream | None:
    in_sums = set(sums)
    leaves = [a for n in sums for a in n.args if a not in in_sums]
    writers = {a: w for a in dict.fromkeys(leaves) if (w := _writer(a, root)) is not None}
    if not writers:
        return None
    shapes = {
        tuple(values[n].shape) for n in [*sums, *writers] if isinstance(values.get(n), Tensor)
    }
    if len(shapes) != 1:
        return None
    shape = shapes.pop()
    if len(shape) < 3:
        return None
    nodes = [*writers, *sums]
    readers: list[tuple[fx.Node, str]] = []
    seen: set[fx.Node] = set()  # stream tensors used by something else
    for n in nodes:
        for u in graph_users(n):
            if u in in_sums:
                continue
            if _conv(_module(root, u)) and u.args[0] is n and len(u.args) == 1:
                readers.append((n, str(u.target)))
            else:
                seen.add(n)
    foreign = any(a not in writers for a in leaves)
    gl = not foreign and not seen and bool(readers)
    stream = LinearStream(sums, writers, readers, shape[1], gl)
    # a stream tensor whose change nothing takes back: seen, or read by a reader that cannot
    fixed = seen | {u for u, r in readers if not _absorbs(root_node(u, r, root), root)}
    stream.shifts = _shift_basis(list(writers), [_above(w, in_sums) for w in writers], fixed)
    return stream


def _shift_basis(
    writers: list[fx.Node], reached: list[set[fx.Node]], fixed: set[fx.Node]
) -> list[dict[fx.Node, Fraction]]:
    """A basis of the writers' shifts `t` (one coefficient per writer) that leave every
    `fixed` tensor unchanged: `Σ_{w reaching n} t_w = 0` for each `n` in `fixed`. Exact
    (fractions, reduced row echelon form): one basis vector per free writer."""
    rows = [[Fraction(int(n in r)) for r in reached] for n in fixed]
    rows = [r for r in rows if any(r)]
    pivots: list[int] = []
    k = len(writers)
    for col in range(k):
        i = next((i for i in range(len(pivots), len(rows)) if rows[i][col] != 0), None)
        if i is None:
            continue
        rows[len(pivots)], rows[i] = rows[i], rows[len(pivots)]
        piv = rows[len(pivots)]
        piv[:] = [v / piv[col] for v in piv]
        for j, r in enumerate(rows):
            if j != len(pivots) and r[col] != 0:
                rows[j] = [a - r[col] * b for a, b in zip(r, piv)]
        pivots.append(col)
    basis = []
    for free in (c for c in range(k) if c not in pivots):
        t = [Fraction(0)] * k
        t[free] = Fraction(1)
        for i, col in enumerate(pivots):
            t[col] = -rows[i][free]
        basis.append({w: v for w, v in zip(writers, t) if v != 0})
    return basis


def root_node(n: fx.Node, reader: str, root: nn.Module) -> fx.Node:
    """The node of the convolution `reader` reading `n`."""
    return next(u for u in graph_users(n) if u.op == "call_module" and str(u.target) == reader)


def _above(w: fx.Node, sums: set[fx.Node]) -> set[fx.Node]:
    """`w` and every sum of the stream it flows into."""
    out, stack = {w}, [w]
    while stack:
        for u in graph_users(stack.pop()):
            if u in sums and u not in out:
                out.add(u)
                stack.append(u)
    return out


def fix_stream_labels(streams: list[LinearStream], prop) -> None:
    """Fix the channel rescalings and permutations of every `GL` stream (its `GL` contains
    them), before the factors are built."""
    for s in streams:
        if not s.gl:
            continue
        for n in [*s.writers, *s.sums]:
            lab = prop.carried(n)
            if lab is not None:
                prop.L.fix_scales(lab[0], "", "", quiet=True)
                prop.L.fix_perms(lab[1], "", "", quiet=True)


@dataclass(frozen=True)
class ShiftIntoReaders:
    """`bias += k v` for each writer `(bias, k)` (a bias or a BatchNorm `β`), and for each
    reader `(weight, bias, bn, eps, k)` of a tensor the shifts change by `k v`: `bias −= k V v`
    (`V` the 1×1 weight), or with `bias = None` the following BatchNorm's
    `β −= k γ / σ · V v`."""

    writers: tuple[tuple[str, float], ...]
    readers: tuple[tuple[str, str | None, str | None, float, float], ...]

    @property
    def param(self) -> str:
        """The first writer's bias (the one the factor's declarations follow)."""
        return self.writers[0][0]

    def __call__(self, new: State, v: Tensor) -> None:
        for param, k in self.writers:
            p = new[param]
            new[param] = p + k * v.to(p.dtype)
        for weight, bias, bn, eps, k in self.readers:
            w = new[weight]
            change = k * (w.reshape(w.shape[0], w.shape[1]) @ v.to(w.dtype))
            if bias is not None:
                new[bias] = new[bias] - change
            else:
                gamma = new[f"{bn}.weight"]
                sigma = torch.sqrt(new[f"{bn}.running_var"].to(gamma.dtype) + eps)
                new[f"{bn}.bias"] = new[f"{bn}.bias"] - gamma / sigma * change

    def touched(self) -> tuple[str, ...]:
        out = [p for p, _ in self.writers]
        for weight, bias, bn, _, _ in self.readers:
            out += [weight, bias] if bias is not None else [weight, f"{bn}.bias"]
            if bn is not None:
                out += [f"{bn}.weight", f"{bn}.running_var"]
        return tuple(out)


class StreamShiftFactor(TranslationFactor):
    """`R^c`: a combination of the writers' bias shifts, taken back by the stream's readers."""

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms for p in t.touched()))

    def canonical(self, state: State) -> Tensor:
        """The shift that zeroes the first writer's bias."""
        term = self.terms[0]
        return -state[term.param] / term.writers[0][1]


def _reader_entry(n: fx.Node, conv: str, root: nn.Module, k: float) -> tuple:
    m = root.get_submodule(conv)
    if m.bias is not None:
        return (f"{conv}.weight", f"{conv}.bias", None, 0.0, k)
    u = root_node(n, conv, root)
    bn = str(graph_users(u)[0].target)
    return (f"{conv}.weight", None, bn, float(root.get_submodule(bn).eps), k)


def _bias(writer: tuple[str, str | None]) -> str:
    conv, bn = writer
    return f"{bn}.bias" if bn else f"{conv}.bias"


def stream_factors(streams: list[LinearStream], root: nn.Module, factors: list) -> list:
    """`factors` with the `GL` and shift factors of `streams`."""
    out: list = []
    shifts: list = []
    for s in streams:
        gl_name = None
        if s.gl:
            terms: list = []
            for conv, bn in s.writers.values():
                m = root.get_submodule(bn) if bn else None
                if bn is not None:
                    terms.append(ConjugatedRows(f"{conv}.weight", bn, float(m.eps)))
                else:
                    terms += [MatTerm(f"{conv}.weight", 0, 0, "inv")]
                    terms += [MatTerm(f"{conv}.bias", 0, 0, "inv")]
            terms += [MatTerm(f"{r}.weight", 1, 0, "T") for _, r in s.readers]
            mods = [c for c, _ in s.writers.values()] + [b for _, b in s.writers.values() if b]
            mods += [r for _, r in s.readers]
            first = next(iter(s.writers.values()))
            gl_name = f"linear_stream:{first[1] or first[0]}"
            out.append(
                LinearStreamFactor(
                    gl_name, s.c, terms=tuple(terms), modules=tuple(dict.fromkeys(mods))
                )
            )
        for coef in s.shifts:
            ws = tuple((_bias(s.writers[w]), float(k)) for w, k in coef.items())
            readers = []
            for u, r in s.readers:
                k = sum(c for w, c in coef.items() if u in _above(w, set(s.sums)))
                if k != 0:
                    readers.append(_reader_entry(u, r, root, float(k)))
            if not readers and all(k == 0 for _, k in ws):
                continue
            term = ShiftIntoReaders(ws, tuple(readers))
            mods = [p.rpartition(".")[0] for p, _ in ws]
            mods += [r[0].rpartition(".")[0] for r in readers]
            shifts.append(
                StreamShiftFactor(
                    f"stream_shift:{'+'.join(p.rpartition('.')[0] for p, _ in ws)}",
                    s.c,
                    terms=(term,),
                    modules=tuple(dict.fromkeys(mods)),
                    moved_by=((gl_name, "inv"),) if gl_name else (),
                )
            )
    return with_moves(factors + out, shifts, lambda f: f.terms[0].param)
