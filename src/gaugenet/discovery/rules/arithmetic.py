"""Arithmetic: sums (scales of the summands merged, a parameter bias carried), products
and quotients (a constant, a per-token factor such as RMSNorm's `1/rms(x)`, a parameter
gain, or two computed tensors as in gated MLPs: the exponents of the two factors add, see
`_labels.py`), powers with a rational exponent (`x ** k`, `square`, `sqrt`, `rsqrt`,
`reciprocal`: the exponents are multiplied by `k`), a constant matrix times a labeled one,
and reductions over positions."""

from __future__ import annotations

import math
import operator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from .._labels import FIXED, ZERO, Labels, unique_pairs
from .._offset_gain import offset_gain
from .._ops import ADD_OPS, MUL_OPS
from ._common import Pair, Unsupported, broadcast_channels, fixed, scale_reps
from ._examples import batch, seeded
from ._rule import Example, Rule

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["RULES", "combine", "power_of"]

aten = torch.ops.aten


def add(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    L = prop.L
    a, b = n.args[0], n.args[1]
    la, lb = prop.lab(a), prop.lab(b)
    pa, pb = prop.param_name(a), prop.param_name(b)
    if la is not None and lb is not None and pa is None and pb is None:
        sa, sb = (x.expand(out.shape) for x in (la[0], lb[0]))
        qa, qb = (x.expand(out.shape) for x in (la[1], lb[1]))
        both = (sa != ZERO) & (sb != ZERO)
        for x, y in unique_pairs(sa[both], sb[both]).tolist():
            L.union(x, y)
        L.align(qa, qb, n.name)
        return torch.where(sa != ZERO, sa, sb).clone(), torch.where(qa != ZERO, qa, qb).clone()
    # `x + b` with `b` a parameter (a parameter plus a number is a constant, below)
    if (la is not None) and (pb is not None or (pa is not None and lb is not None)):
        (s, p), pname = (la, pb) if pb is not None else (lb, pa)
        return _bias_add(prop, n, s, p, pname, out)
    lab = la if la is not None else lb
    other = b if la is not None else a
    if lab is None:
        raise Unsupported("addition of unlabeled values")
    if isinstance(other, (int, float)) and other == 0:
        return lab
    L.fix_scales(lab[0], n.name, "adding a constant is not homogeneous")
    if isinstance(other, (int, float)):
        return torch.zeros_like(lab[0]), lab[1]
    L.fix_perms(lab[1], n.name, "adding a constant tensor")
    return fixed(out)


def _bias_add(prop: Propagator, n: fx.Node, s: Tensor, p: Tensor, pname: str, out: Tensor) -> Pair:
    """`x + b` with `b` a parameter: `b` is scaled and permuted with `x`'s channels."""
    prop.use_param(pname, n.name)
    b = prop.root.get_parameter(pname)
    if b.ndim != 1:
        raise Unsupported(f"adding the {b.ndim}-d parameter {pname}")
    reps = scale_reps(prop.L, s.expand(out.shape), -1)
    prop.L.scale_terms.append((pname, reps, 1))
    prop.carrier(n.name, [pname], p.expand(out.shape), axis=-1)
    return broadcast_channels(reps, out.shape, -1), p.expand(out.shape).clone()


def mul(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    a, b = n.args[0], n.args[1]
    div = n.target in (operator.truediv, torch.div, operator.itruediv)
    if div and n.kwargs.get("rounding_mode") is not None:
        raise Unsupported("a division that rounds is not homogeneous")
    if not div and prop.param_name(a) is not None and prop.param_name(b) is None:
        a, b = b, a  # a parameter gain on the left: `γ * x`
    la, lb = prop.lab(a), prop.lab(b)
    if not div and la is not None and prop.param_name(b) is not None:
        gained = _gain(prop, n, la, prop.param_name(b), out)
        if gained is not None:
            return gained
    if not div:  # `x · (w + c)`: a gain stored with an offset (`_offset_gain.py`)
        for x, y in ((a, b), (b, a)):
            og, lx = offset_gain(y, prop.root), prop.lab(x)
            if og is not None and lx is not None and prop.param_name(x) is None:
                gained = _gain(prop, n, lx, og.param, out, og.offset)
                if gained is not None:
                    return gained
    if (
        la is not None
        and lb is not None
        and not div
        and _per_token(prop.env_or(b), out)
        and not bool((lb[0] > 0).any() or (lb[1] > 0).any())
        and prop.param_name(b) is None
    ):
        # `x * r` with `r` one unlabeled number per token (a norm's `1/rms(x)`): channels
        # keep their labels
        return la[0].expand(out.shape).clone(), la[1].expand(out.shape).clone()
    if la is not None and lb is None and isinstance(b, (int, float)):
        return la
    if la is None and lb is not None and isinstance(a, (int, float)) and not div:
        return lb
    if la is None and lb is not None and isinstance(a, (int, float)) and div:
        # `c / x`: the exponents of `x` negated
        return power_of(prop.L, lb[0], Fraction(-1), n.name), lb[1]
    if la is not None and lb is not None:
        pa, pb = prop.param_name(a), prop.param_name(b)
        if pb is not None and not div:
            prop.use_param(pb, n.name)
            prop.carrier(n.name, [pb], la[1].expand(out.shape), axis=-1)
            return la[0].expand(out.shape).clone(), la[1].expand(out.shape).clone()
        a_fixed = not bool((la[0] > 0).any()) and pa is None
        b_fixed = not bool((lb[0] > 0).any()) and pb is None
        if b_fixed and not bool((lb[1] > 0).any()):
            prop.L.fix_perms(la[1], n.name, "multiplied by an unpermuted tensor")
            return la[0].expand(out.shape).clone(), torch.zeros(out.shape, dtype=torch.long)
        if a_fixed and not div and not bool((la[1] > 0).any()):
            prop.L.fix_perms(lb[1], n.name, "multiplied by an unpermuted tensor")
            return lb[0].expand(out.shape).clone(), torch.zeros(out.shape, dtype=torch.long)
        if pa is None and pb is None:
            return _product(prop, n, la, lb, out, -1 if div else 1)
    raise Unsupported("product of two tensors that both carry scales")


def _gain(
    prop: Propagator, n: fx.Node, la: Pair, pname: str, out: Tensor, offset: float = 0.0
) -> Pair | None:
    """`x * γ` with `γ` a per-feature parameter (as in RMSNorm): `γ` is a source of one
    fresh scale `f` per feature, which its readers take back; the product's exponents are
    `x`'s plus `f` (just `f` where `x` carries no free scale, the usual normalized
    stream). With an `offset` `c`, the gain is `γ + c` (stored as `γ`): it scales the same
    way, by the `OffsetScale` term `γ ↦ α (γ + c) − c`."""
    L = prop.L
    g = prop.root.get_parameter(pname)
    s, p = la
    if g.ndim != 1 or out.shape[-1] != g.shape[0]:
        return None
    prop.use_param(pname, n.name)
    prop.carrier(n.name, [pname], p.expand(out.shape), axis=-1)
    fresh = L.fresh(g.shape[0], pname.rpartition(".")[0] or pname)
    L.scale_terms.append((pname, fresh, 1, offset) if offset else (pname, fresh, 1))
    pcols = L.per_channel(p.expand(out.shape), -1)
    if all(len(c) == 1 for c in pcols):
        L.links.append((fresh, torch.tensor([int(c[0]) for c in pcols])))
    scale = combine(L, s.expand(out.shape), broadcast_channels(fresh, out.shape, -1), 1, n.name)
    return scale, p.expand(out.shape).clone()


def _product(prop: Propagator, n: fx.Node, la: Pair, lb: Pair, out: Tensor, sign: int = 1) -> Pair:
    """`a * b` (`sign` 1) or `a / b` (`sign` −1) of two computed tensors (a gated MLP's
    `act(gate(x)) * up(x)`): each entry's exponents are the sum (difference) of the two
    factors' (a monomial id where both are free, see `_labels.py`), and the channels of both
    move together."""
    L = prop.L
    sa, sb = (x.expand(out.shape) for x in (la[0], lb[0]))
    qa, qb = (x.expand(out.shape) for x in (la[1], lb[1]))
    if sign < 0 and bool((sb == ZERO).any()):
        raise Unsupported("division by a tensor with zero entries")
    L.align(qa, qb, n.name)
    scale, perm = combine(L, sa, sb, sign, n.name), torch.where(qa != ZERO, qa, qb).clone()
    # the product's scale per channel, when it has one: a permutation of the channels
    # re-indexes the exponents of the product too (see `_build._perm_factors`)
    scols, pcols = L.per_channel(scale, -1), L.per_channel(perm, -1)
    if all(len(c) == 1 for c in scols) and all(len(c) == 1 for c in pcols):
        L.links.append(
            (torch.tensor([int(c[0]) for c in scols]), torch.tensor([int(c[0]) for c in pcols]))
        )
    return scale, perm


def combine(L: Labels, sa: Tensor, sb: Tensor, sign: int, node: str) -> Tensor:
    """Entrywise labels of `a * b**sign` from those of `a` and `b` (same shape): one id per
    distinct pair of ids; `ZERO` where either is zero."""
    zero = (sa == ZERO) | (sb == ZERO)
    live = ~zero
    out = torch.full(sa.shape, ZERO, dtype=torch.long)
    if not bool(live.any()):
        return out
    pairs = unique_pairs(sa[live], sb[live])
    # a pair with a fixed factor (times a constant, or a constant over a scale) is the
    # other factor's class: no exponent vector to reduce (the common case, by far)
    found: list[int | None] = []
    vecs: list[dict[int, Fraction]] = []
    for x, y in pairs.tolist():
        rx, ry = L.find(x), L.find(y)
        if ry == FIXED or (rx == FIXED and sign == 1):
            found.append(rx if ry == FIXED else ry)
            continue
        found.append(None)
        vec = {x: Fraction(1)}
        vec[y] = vec.get(y, Fraction(0)) + sign
        vecs.append(vec)
    solved = iter(L.monomials(vecs, node))
    ids = torch.tensor([next(solved) if v is None else v for v in found], dtype=torch.long)
    keys = pairs[:, 0] * (1 << 31) + pairs[:, 1]
    at = torch.searchsorted(keys, sa[live] * (1 << 31) + sb[live])
    out[live] = ids[at]
    return out


def power_of(L: Labels, s: Tensor, k: Fraction, node: str) -> Tensor:
    """Entrywise labels of `x ** k` (`k` rational) from those of `x`: `k` times each id
    (zero entries stay `ZERO` for `k > 0`; a negative power of zero is refused)."""
    zero = s == ZERO
    if k <= 0 and bool(zero.any()):
        raise Unsupported("a non-positive power of a tensor with zero entries")
    out = torch.full(s.shape, ZERO, dtype=torch.long)
    uniq = torch.unique(s[~zero])
    ids = torch.tensor(L.monomials([{int(v): k} for v in uniq.tolist()], node), dtype=torch.long)
    out[~zero] = ids[torch.searchsorted(uniq, s[~zero])]
    return out


#: the exponent of each power-like function of one tensor
_POWERS: dict[Any, Fraction] = {
    torch.rsqrt: Fraction(-1, 2),
    torch.sqrt: Fraction(1, 2),
    torch.reciprocal: Fraction(-1),
    torch.square: Fraction(2),
    aten.rsqrt.default: Fraction(-1, 2),
    aten.sqrt.default: Fraction(1, 2),
    aten.reciprocal.default: Fraction(-1),
    aten.square.default: Fraction(2),
    "rsqrt": Fraction(-1, 2),
    "sqrt": Fraction(1, 2),
    "reciprocal": Fraction(-1),
    "square": Fraction(2),
}


def power(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`x ** k` for a constant `k` with a small denominator (`pow`, `square`, `sqrt`,
    `rsqrt`, `reciprocal`): `(α x)^k = α^k x^k` for `α > 0`, so each entry's exponents are
    multiplied by `k`; channels pass on."""
    if n.target in _POWERS:
        k = _POWERS[n.target]
    else:  # `pow` as a function, an operator or a method
        e = n.args[1] if len(n.args) > 1 else n.kwargs.get("exponent")
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e):
            raise Unsupported("a power whose exponent is not a constant number")
        k = Fraction(e).limit_denominator(64)
        if k != e:
            raise Unsupported(f"the power {e} is not a ratio of small integers")
    _, (s, p) = prop.first(n)
    return power_of(prop.L, s, k, n.name).reshape(out.shape), p.expand(out.shape).clone()


def _per_token(other: Any, out: Tensor) -> bool:
    """`other` is one number per token: a tensor of `out`'s rank, size 1 on the last axis."""
    return (
        isinstance(other, Tensor)
        and other.ndim == out.ndim
        and other.shape[-1] == 1
        and out.shape[-1] > 1
    )


def matmul(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`A @ X` with `A` constant mixes rows of `X`: each column keeps one scale and channel.
    (Attention's products of two computed tensors are the attention pattern's.)"""
    a, b = n.args[0], n.args[1]
    la, lb = prop.lab(a), prop.lab(b)
    const_a = la is not None and not bool((la[0] > 0).any() or (la[1] > 0).any())
    if const_a and lb is not None and prop.param_name(a) is None and lb[0].ndim >= 2:
        s, p = lb
        reps = scale_reps(prop.L, s, -1)
        pcols = prop.L.per_channel(p, -1)
        if any(len(c) > 1 for c in pcols):
            prop.L.fix_perms(p, n.name, "matmul over mixed channels")
        pids = torch.tensor([int(c[0]) if len(c) == 1 else FIXED for c in pcols])
        return broadcast_channels(reps, out.shape, -1), broadcast_channels(pids, out.shape, -1)
    raise Unsupported("matmul of two tensors that carry scales or channels")


def reduce(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """A sum or mean over some axes: the scales of what is summed are merged."""
    _, (s, p) = prop.first(n)
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if dims is None:
        raise Unsupported("reduction over all dimensions")
    dims = [dims] if isinstance(dims, int) else list(dims)
    keep = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
    dims = sorted(d % s.ndim for d in dims)
    rest = [d for d in range(s.ndim) if d not in dims]
    sm = s.permute(*rest, *dims).reshape(*[s.shape[d] for d in rest], -1)
    pm = p.permute(*rest, *dims).reshape(*[s.shape[d] for d in rest], -1)
    s_out = torch.tensor([prop.L.union_all(r) for r in sm.reshape(-1, sm.shape[-1])])
    p_uniq = [torch.unique(r[r != ZERO]) for r in pm.reshape(-1, pm.shape[-1])]
    p_out = torch.tensor([int(u[0]) if len(u) == 1 else FIXED for u in p_uniq])
    s_out, p_out = s_out.reshape(sm.shape[:-1]), p_out.reshape(sm.shape[:-1])
    if keep:
        for d in dims:
            s_out, p_out = s_out.unsqueeze(d), p_out.unsqueeze(d)
    return s_out.reshape(out.shape), p_out.reshape(out.shape)


# -- examples ---------------------------------------------------------------------------------
class _Branches(nn.Module):
    """Two ReLU branches summed (one biased by a parameter added to it), a scalar factor,
    and a mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4, bias=False), nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x) + self.shift) + torch.relu(self.b(x)) * 0.5
        return self.out(h.mean(1) / 2)


class _Gated(nn.Module):
    """`down(silu(gate(x)) * up(x))` (SwiGLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(3, 4, bias=False), nn.Linear(3, 4, bias=False)
        self.down = nn.Linear(4, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class _RMS(nn.Module):
    """RMSNorm written out (`x * rsqrt(mean(x²) + ε) * γ`) before a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.g, self.out = nn.Parameter(torch.rand(4) + 0.5), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.out(x * r * self.g)


class _ReGLU(nn.Module):
    """`down(relu(gate(x)) * up(x))` (ReGLU): both factors of the product rescale."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(3, 4, bias=False), nn.Linear(3, 4)
        self.down = nn.Linear(4, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))


class _Square(nn.Module):
    """A squared hidden layer, `out(h * h)` with `h = a(x)`."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(6, 3), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.out(h * h)


class _Root(nn.Module):
    """`out(sqrt(h * h))`, `h = a(x)`: a power `2`, then `1/2`."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.out(torch.sqrt(h * h))


class _RMSNoEps(nn.Module):
    """RMSNorm written out without `ε` (`h * rsqrt(mean(h * h)) * γ`) after a linear map,
    then a ReLU (no rotation of `h` survives it): invariant to one common scale of `h`."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        self.g = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.out(torch.relu(h * torch.rsqrt((h * h).mean(-1, keepdim=True)) * self.g))


def negate(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`-x`: a sign commutes with every positive scale, so the scale labels pass unchanged.
    Permutations are fixed: where negated entries meet entries of the same channels that
    are not (rotary's `cat(-x2, x1)`), permuting the channels would move the sign."""
    _, (s, p) = prop.first(n)
    prop.L.fix_perms(p, n.name, "a negation: permuting its channels would move the sign")
    return s, fixed(out)[1]


class _Rotated(nn.Module):
    """Half-rotation of hidden units (`cat(-x2, x1)`, as rotary embeddings write it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        return self.out(torch.cat([-h[..., 2:], h[..., :2]], -1))


class _Mixed(nn.Module):
    """A constant matrix (a buffer) mixing the tokens of a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("mix", torch.randn(5, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.matmul(self.mix, torch.relu(self.a(x))))


RULES = (
    Rule(
        "add",
        "arithmetic",
        add,
        (
            Example(
                lambda: (seeded(_Branches), batch(64, 5, 3)),
                4,
                "both branches' hidden units share one scale per feature (4), the bias with it",
            ),
        ),
        functions=tuple(ADD_OPS),
    ),
    Rule(
        "mul",
        "arithmetic",
        mul,
        (
            Example(
                lambda: (seeded(_Gated), batch(64, 3)),
                4,
                "SiLU fixes the gate; each up-projection row scales against its down column (4)",
            ),
            Example(
                lambda: (seeded(_RMS), batch(64, 4)),
                4,
                "γ of each feature scaled against the reading column: 4",
            ),
            Example(
                lambda: (seeded(_ReGLU), batch(64, 3)),
                8,
                "gate rows and up rows each scale; down's column takes their product: 4 + 4",
            ),
            Example(
                lambda: (seeded(_Square), batch(64, 6)),
                3,
                "each hidden unit scales by α, the reading column by α⁻²: 3",
            ),
            Example(
                lambda: (seeded(_RMSNoEps), batch(64, 3)),
                5,
                "one common scale of the normalized layer, and γ against the reading column: 1 + 4",
            ),
        ),
        functions=tuple(MUL_OPS),
    ),
    Rule(
        "power",
        "arithmetic",
        power,
        (
            Example(
                lambda: (seeded(_Root), batch(64, 3)),
                4,
                "each hidden unit scales by α, the reading column by α⁻¹: 4",
            ),
        ),
        functions=(
            torch.pow,
            operator.pow,
            aten.pow.Tensor_Scalar,
            *(k for k in _POWERS if not isinstance(k, str)),
        ),
        methods=("pow", *(k for k in _POWERS if isinstance(k, str))),
    ),
    Rule(
        "negate",
        "arithmetic",
        negate,
        (Example(lambda: (seeded(_Rotated), batch(64, 3)), 4, "one scale per ReLU unit: 4"),),
        functions=(torch.neg, operator.neg),
        methods=("neg", "__neg__"),
    ),
    Rule(
        "constant matmul",
        "arithmetic",
        matmul,
        (Example(lambda: (seeded(_Mixed), batch(64, 5, 3)), 4, "one scale per hidden unit: 4"),),
        functions=(torch.matmul, operator.matmul),
    ),
    Rule(
        "reduce",
        "arithmetic",
        reduce,
        (Example(lambda: (seeded(_Branches), batch(64, 5, 3)), 4, "as for add: 4"),),
        functions=(torch.mean, torch.sum),
        methods=("mean", "sum"),
    ),
)
