"""The value-bias shift of a value projection without a bias that reads a LayerNorm.

A LayerNorm returns `y = γ ⊙ n + β` with `1ᵀ n = 0` at every token, so `(1/γ)ᵀ y = s`, the
same number `s = 1ᵀ β̃` (`β̃ = β/γ`) at every token. A value projection `v = W_v y` without a
bias therefore has one all the same: for `u ∈ R^rows` (one entry per value row),

    W_v[rows] ↦ W_v[rows] + (u / s) (1/γ)ᵀ

adds exactly `u` to the values at every token. Softmax weights sum to one, so each head's
output moves by its part of `u` (its key-value head's, under grouped queries), and the
output projection turns that into the constant `W_o u` at every token, which a bias added
to the output projection's result takes back (`b ↦ b − W_o u`): the projection's own, or
the bias of a layer whose output is only summed with it (the MLP of a parallel block, as
GPT-J's), found in the graph (`absorbing_bias`). This is the value-bias shift of
`attention/_factors.py` with the bias written in the LayerNorm's coordinates; where the
attention output is centered (a LayerNorm alone reads it), the compensation is projected
off `1`, as for the value-bias shift (`_centering.py`).

Coordinates. In `W̃ = W diag(γ)` the move is `W̃_v ↦ W̃_v + (u / s) 1ᵀ`. The LayerNorm's
offset group turns these rows on the right (`W̃ ↦ W̃ g`, `β̃ ↦ g⁻¹ β̃`, `g = I + c 1ᵀ`,
`groups/_offset.py`): `1ᵀ g = (1 + 1ᵀc) 1ᵀ` and `1ᵀ g⁻¹ β̃ = s / (1 + 1ᵀc)`, so the
move and the offset commute (a move written as `W̃_v ↦ W̃_v + a 1ᵀ` would be scaled by
`1 + 1ᵀc`, which is why it is written with `1/s`). The LayerNorm's rescalings (of `γ, β`
with the readers' columns) keep `W̃` and `β̃`, and a rotation `Q` of the stream with
`Q 1 = 1` keeps `1ᵀ` and `s`: both commute. The value-output `GL` moves `u` as it moves a
value bias (`moved_by`, mode `"T"`), and the head permutations carry its blocks. All of this
is checked, not assumed (`link_value_row_shifts`).

Where no bias takes the constant back but only LayerNorms read the output projection's
result (a `CenteredOutputFactor` of it), the shift holds on the one line `P W_o u = 0`
(`P = I − 11ᵀ/d`): a factor of one dimension (`AlongOne`, `_value_row_one.py`).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from ..groups import GaugeGroup, GLFactor, OrthogonalFactor, PermutationFactor, TranslationFactor
from ..groups._algebra import AlgebraFactor
from ..groups._base import State
from ..groups._group import model_state
from ._centering import CenteredOutputFactor
from ._head_norm_find import _layernorm_read
from ._linear import Linear, keeps_last_axis
from ._offset_layernorm import effective_gain, gain_offset
from ._ops import graph_users, passes_input
from ._value_row_one import AlongOne, centered_columns, one_dimensional_kernel
from ._value_rows import ValueRows

__all__ = [
    "ValueRowShift",
    "ValueRowShiftFactor",
    "absorbing_bias",
    "link_value_row_shifts",
    "value_row_shift",
]

#: `|Σ β/γ| / Σ |β/γ|` at or below which the LayerNorm gives the rows no constant
SUM_RATIO = 1e-6
#: relative parameter difference under the two orders below which factors commute
_COMMUTE = 1e-10

_ADD = {torch.add, operator.add, operator.iadd, torch.ops.aten.add.Tensor}


@dataclass(frozen=True)
class ValueRowShift(ValueRows):
    """`W_v[rows] += (u/s) ⊗ (1/γ)` and `bias −= W_o u` (module docstring).

    Fields as `ValueRows`'s, and `bias`: the bias that takes `W_o u` back; `block`: rows
    per key-value head; `repeat`: query heads reading each key-value head (their columns
    of `W_o` in turn); `center`: that compensation projected off `1` (`_centering.py`).
    """

    bias: str
    block: int
    repeat: int = 1
    center: bool = False

    def __call__(self, new: State, u: Tensor) -> None:
        self.add_to_values(new, u)
        u = u.to(new[self.value].dtype)
        if self.repeat > 1:
            u = u.reshape(-1, self.block).repeat_interleave(self.repeat, 0).reshape(-1)
        w = new[self.weight].narrow(self.axis, self.weight_offset, u.shape[0])
        change = torch.tensordot(w, u, dims=([self.axis], [0]))
        if self.center:
            change = change - change.mean()
        b = new[self.bias]
        new[self.bias] = b - change.to(b.dtype)

    def touched(self) -> tuple[str, ...]:
        return (self.value, self.weight, self.bias, *self.ln_params())


@dataclass(eq=False)
class ValueRowShiftFactor(TranslationFactor):
    """`R^rows`: the value-bias shift of a bias-free value projection reading a LayerNorm
    (`ValueRowShift`); or `R`: its one direction whose constant only LayerNorms see
    (`AlongOne`, `_value_row_one.py`)."""

    @property
    def shift(self) -> ValueRowShift | AlongOne:
        return self.terms[0]

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms for p in t.touched()))

    def canonical(self, state: State) -> Tensor:
        """The shift zeroing the value rows' constant `b = W_v[rows] β` (`(rows,)`, the
        value bias the LayerNorm gives them, which the shift moves by `u`); for `AlongOne`,
        its component along `V` in the metric `G⁻¹` of each head's centered rows (`(1,)`).

        `b = W̃_v β̃` is kept by the LayerNorm's offsets and rescalings and by stream
        rotations; the value-output `GL` maps `b` as it maps a value bias (`b ↦ C b`, and
        `V ↦ C V`, `G ↦ C G Cᵀ` for `AlongOne`), so the gauge is orbit-independent."""
        t = self.shift
        W = state[t.value].double()
        rows = (W if t.value_axis == 0 else W.T)[torch.tensor(t.rows, dtype=torch.long)]
        b = rows @ state[f"{t.ln}.bias"].double()
        if isinstance(t, ValueRowShift):
            return (-b).to(W.dtype)
        V = t.direction(state, torch.float64)
        return (-(b * t.metric(state, V)).sum()).reshape(1).to(W.dtype)


# -- finding it ---------------------------------------------------------------------------


def _offset_free(ln: nn.Module) -> bool:
    """The LayerNorm has `β` with `Σ β/γ` not negligible (`> SUM_RATIO Σ |β/γ|`)."""
    if getattr(ln, "bias", None) is None or ln.bias.is_meta:
        return False
    gamma = effective_gain(ln)
    beta = ln.bias.detach().double()
    bt = beta / gamma.double() if gamma is not None else beta
    return float(bt.sum().abs()) > SUM_RATIO * float(bt.abs().sum())


def _is_add(n: object) -> bool:
    return (
        isinstance(n, fx.Node)
        and n.op == "call_function"
        and n.target in _ADD
        and not n.kwargs
        and len(n.args) == 2
    )


def absorbing_bias(po: Linear, root: nn.Module, values: dict) -> str | None:
    """The bias that can take back a constant added to `po`'s output at every token: its
    own; else, where `po`'s output (through eval-mode dropouts and reshapes keeping its
    features last) is read only by a tree of additions, the bias of another affine layer
    summed there whose output nothing else reads (`_summed_biases.py`); else `None`."""
    if po.bias is not None:
        return po.bias
    # imported here: `_summed_biases` reaches the rules, which import `_attention`
    from ._summed_biases import _leaves, _writer

    out = values.get(po.node)
    if not isinstance(out, Tensor):
        return None
    features = int(out.shape[-1])
    n = po.node
    while True:
        users = graph_users(n)
        if len(users) != 1:
            return None
        (u,) = users
        if passes_input(u, root) or (keeps_last_axis(u, features, values) and u.args[0] is n):
            n = u
            continue
        break
    if not _is_add(u):
        return None
    top = u
    while len(graph_users(top)) == 1 and _is_add(graph_users(top)[0]):
        top = graph_users(top)[0]
    total = values.get(top)
    if not isinstance(total, Tensor) or values.get(n) is None or values[n].shape != total.shape:
        return None
    leaves = _leaves(top)
    if not any(a is n for a in leaves):
        return None  # reached through an addition something else reads
    for a in leaves:
        w = _writer(a, root, total.shape, values)
        if w is None or w[0] == po.name or w[1] != total.ndim - 1:
            continue
        return f"{w[0]}.bias"
    return None


def _layernorm_of(lin: Linear, root: nn.Module) -> str | None:
    """The LayerNorm the projection reads (as `_head_norm_find._layernorm_read`)."""
    return _layernorm_read(lin, root, lin.shape(root)[1])


def value_row_shift(
    name: str,
    pv: object,
    po: Linear,
    o_off: int,
    hkv: int,
    rep: int,
    vo: object,
    modules: tuple[str, ...],
    root: nn.Module,
    values: dict,
) -> list[ValueRowShiftFactor]:
    """The shift of the module docstring for the value projection `pv` (a traced `Proj`
    without a bias) and the output projection `po` (values at its columns `o_off:`), `hkv`
    key-value heads each read by `rep` query heads; `[]` where the projection reads no
    LayerNorm with `Σ β/γ ≠ 0` or no bias takes the constant back."""
    lin = pv.lin
    if not isinstance(lin, Linear) or lin.bias is not None:
        return []
    ln = _layernorm_of(lin, root)
    if ln is None:
        return []
    m = root.get_submodule(ln)
    if not _offset_free(m):
        return []
    dv = pv.maps.shape[-1]
    rows = tuple(pv.block_rows()[:hkv].reshape(-1).tolist())
    bias = absorbing_bias(po, root, values)
    if bias is None:
        return _along_one(name, lin, rows, ln, m, po, o_off, dv, rep, modules, root)
    term = ValueRowShift(*_rows_of(lin, rows, ln, m, po, o_off), bias, dv, rep)
    mods = tuple(dict.fromkeys([*modules, ln, bias.rpartition(".")[0]]))
    return [
        ValueRowShiftFactor(
            f"{name}.value_row_shift",
            hkv * dv,
            terms=(term,),
            moved_by=((vo.name, "T"),),
            modules=mods,
        )
    ]


def _rows_of(
    lin: Linear, rows: tuple[int, ...], ln: str, m: nn.Module, po: Linear, o_off: int
) -> tuple:
    """`ValueRows`' fields, in order: the value projection `lin`'s `rows`, the LayerNorm
    `m` at `ln` they read, and the output projection `po`'s columns from `o_off`."""
    has_gain = getattr(m, "weight", None) is not None
    return (lin.weight, lin.out_axis, rows, ln, has_gain, gain_offset(m), po.weight,
            po.in_axis, o_off)  # fmt: skip


def _along_one(
    name: str,
    lin: Linear,
    rows: tuple[int, ...],
    ln: str,
    m: nn.Module,
    po: Linear,
    o_off: int,
    dv: int,
    rep: int,
    modules: tuple[str, ...],
    root: nn.Module,
) -> list[ValueRowShiftFactor]:
    """The shift along the one `u` with `P W_o u = 0` (`_value_row_one.py`), where `P W_o`
    has a one-dimensional kernel; kept by the link only where the output projection's output
    is centered (a `CenteredOutputFactor` of it)."""
    if dv % 2 and len(rows) > dv:
        return []  # permuting two heads of odd size flips the orientation `σ`
    W = root.get_parameter(po.weight).detach().double()
    M = centered_columns(W, po.in_axis, o_off, len(rows), dv, rep)
    if not one_dimensional_kernel(M):
        return []
    term = AlongOne(*_rows_of(lin, rows, ln, m, po, o_off), dv, rep)
    mods = tuple(dict.fromkeys([*modules, ln]))
    return [ValueRowShiftFactor(f"{name}.value_row_shift", 1, terms=(term,), modules=mods)]


# -- linking ------------------------------------------------------------------------------


def link_value_row_shifts(factors: list, model: nn.Module) -> list:
    """`factors` with every `ValueRowShiftFactor` kept only where it composes as declared
    with every continuous factor sharing its parameters: random elements of both, applied
    to the model's parameters in float64 in either order (the shift moved as declared),
    give the same parameters (relative `1e-10`). One that does not is left out (the group
    then misses its directions, which `certify` reports) rather than composed wrongly."""
    if not any(isinstance(f, ValueRowShiftFactor) for f in factors):
        return factors
    state = {k: v.double() if v.is_floating_point() else v for k, v in model_state(model).items()}
    centered = {f.shift.weight for f in factors if isinstance(f, CenteredOutputFactor)}
    out = []
    for f in factors:
        if isinstance(f, ValueRowShiftFactor):
            if isinstance(f.shift, AlongOne):
                if f.shift.weight not in centered:
                    continue
                f = _oriented(f, factors)
            if not _composes(f, factors, state):
                continue
        out.append(f)
    return out


def _oriented(f: ValueRowShiftFactor, factors: list) -> ValueRowShiftFactor:
    """The shift along `1` with its orientation's sign declared for every matrix factor on
    its parameters: the value-output `GL` and a rotation of the stream flip `V` with the sign
    of their determinant (`_value_row_one.py`)."""
    mine = set(f.params())
    moved = tuple(
        (g.name, "sign")
        for g in factors
        if isinstance(g, (GLFactor, AlgebraFactor, OrthogonalFactor)) and mine & set(g.params())
    )
    return dataclasses.replace(f, moved_by=moved)


def _composes(f: ValueRowShiftFactor, factors: list, state: State) -> bool:
    gen = torch.Generator().manual_seed(0)
    mine = set(f.params())
    a = f.sample(gen)
    for g in factors:
        if g.name == f.name or isinstance(g, PermutationFactor) or not mine & set(g.params()):
            continue
        b = g.sample(gen)
        # the declarations about `g` alone (the others name factors not in the pair)
        fg = dataclasses.replace(
            f,
            moved_by=tuple(m for m in f.moved_by if m[0] == g.name),
            scaled_by=tuple(m for m in f.scaled_by if m[0] == g.name),
        )
        after = GaugeGroup((g, fg), (), ())._rescale_shift(fg, a, {g.name: b})
        try:
            one = g.apply(f.apply(state, a), b)
            two = f.apply(g.apply(state, b), after)
        except (KeyError, RuntimeError, IndexError):
            return False
        for k in one:
            x, y = one[k], two[k]
            if not x.is_floating_point():
                continue
            ref = max(float(x.abs().max()) if x.numel() else 0.0, 1.0)
            if x.shape != y.shape or float((x - y).abs().max()) > _COMMUTE * ref:
                return False
    return True
