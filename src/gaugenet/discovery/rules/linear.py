"""Linear maps: `nn.Linear`, convolutions (grouped and depthwise included), a parameter
matrix product (`addmm`, `mm`), and embedding tables.

A linear layer is a sink and a source: each input channel's scale divides its weight
column, and each output channel gets a fresh scale (and channel id) that its weight row and
bias carry. `B(A x)` with nothing between gets the full GL (see `consecutive_linear`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from ...groups import AffineFactor, AffineTerm, GLFactor, MatTerm
from .._labels import ZERO
from .._linear import right_product
from ._common import Pair, Unsupported, broadcast_channels, fixed, scale_reps
from ._examples import batch, seeded, token_ids
from ._rule import Example, Rule

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["RULES", "consecutive_linear"]

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def linear(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`nn.Linear`: an affine layer, and a GL with a linear layer it reads directly."""
    m = prop.submodule(n)
    _, (s, p) = prop.first(n)
    lab = affine_layer(prop, str(n.target), m, s, p, out)
    consecutive_linear(prop, n, m)
    return lab


def conv(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`nn.Conv1d/2d/3d`: an affine layer over channels (axis 1)."""
    _, (s, p) = prop.first(n)
    return affine_layer(prop, str(n.target), prop.submodule(n), s, p, out)


CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_transpose(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`nn.ConvTranspose1d/2d/3d` (ungrouped): an affine layer over channels whose weight
    is stored `(in, out, k...)`: input channels on its axis 0, outputs on axis 1."""
    _, (s, p) = prop.first(n)
    name, m, L = str(n.target), prop.submodule(n), prop.L
    if m.groups != 1:
        raise Unsupported(f"grouped {type(m).__name__} is not analyzed")
    w = m.weight
    prop.use_param(f"{name}.weight", name)
    reps = scale_reps(L, s, 1)
    L.scale_terms.append((f"{name}.weight", reps.reshape(-1, *([1] * (w.ndim - 1))), -1))
    pcols = L.per_channel(p, 1)
    if all(len(c) <= 1 for c in pcols):
        ids = torch.tensor([int(c[0]) if len(c) else ZERO for c in pcols])
        L.perm_terms.append((f"{name}.weight", 0, ids))
    else:
        L.fix_perms(p, name, "mixed channels into a transposed convolution")
    fresh = L.fresh(w.shape[1], name)
    L.scale_terms.append((f"{name}.weight", fresh.reshape(1, -1, *([1] * (w.ndim - 2))), 1))
    L.perm_terms.append((f"{name}.weight", 1, fresh))
    L.links.append((fresh, fresh))
    if m.bias is not None:
        prop.use_param(f"{name}.bias", name)
        L.scale_terms.append((f"{name}.bias", fresh, 1))
        L.perm_terms.append((f"{name}.bias", 0, fresh))
    lab = broadcast_channels(fresh, out.shape, 1)
    return lab, lab.clone()


def affine_layer(
    prop: Propagator, name: str, m: nn.Module, s: Tensor, p: Tensor, out: Tensor
) -> Pair:
    L = prop.L
    is_conv = isinstance(m, CONV)
    axis = 1 if is_conv else -1
    groups = m.groups if is_conv else 1
    prop.use_param(f"{name}.weight", name)
    # sink: each input channel's scale divides its weight column
    reps = scale_reps(L, s, axis)
    w = m.weight
    ipg, opg = w.shape[1], w.shape[0] // groups
    # (1, in) broadcast over the output rows when ungrouped: a weight-sized index would
    # cost 8 bytes per weight entry (gigabytes for a large model analyzed on meta)
    col_index = (
        reps.reshape(1, ipg) if groups == 1 else reps.reshape(groups, ipg).repeat_interleave(opg, 0)
    )  # (out or 1, in/groups)
    col_index = col_index.reshape(*col_index.shape, *([1] * (w.ndim - 2)))
    L.scale_terms.append((f"{name}.weight", col_index, -1))
    pcols = L.per_channel(p, axis)
    if groups == 1 and all(len(c) <= 1 for c in pcols):
        ids = torch.tensor([int(c[0]) if len(c) else ZERO for c in pcols])
        L.perm_terms.append((f"{name}.weight", 1, ids))
    else:
        L.fix_perms(p, name, "grouped convolution or mixed channels")
    # source: fresh ids per output channel
    fresh = L.fresh(w.shape[0], name)
    L.scale_terms.append((f"{name}.weight", fresh.reshape(-1, *([1] * (w.ndim - 1))), 1))
    L.perm_terms.append((f"{name}.weight", 0, fresh))
    L.links.append((fresh, fresh))
    if groups > 1:
        # output channel c reads only the inputs of its group: a permutation across
        # groups changes what it reads (and the input side is fixed above)
        L.fix_perms(fresh, name, "grouped convolution: outputs read their group only")
    if m.bias is not None:
        prop.use_param(f"{name}.bias", name)
        L.scale_terms.append((f"{name}.bias", fresh, 1))
        L.perm_terms.append((f"{name}.bias", 0, fresh))
    lab = broadcast_channels(fresh, out.shape, axis)
    return lab, lab.clone()


def matmul_param(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`addmm(b, x, W)` / `mm(x, W)` with parameters `W` (`(in, out)`, as GPT-2's Conv1D)
    and `b`: a linear layer in the paper's orientation."""
    addmm = n.target is torch.ops.aten.addmm.default
    bias_node, x, w_node = n.args if addmm else (None, *n.args)
    wname = prop.param_name(w_node)
    bname = prop.param_name(bias_node) if addmm else None
    if n.kwargs or wname is None or (addmm and bname is None):
        raise Unsupported("matrix product with computed operands or coefficients")
    return _param_product(prop, n, x, wname, bname, 1, out)


def linear_param(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`aten.linear(x, W[, b])` on parameters `W` (`(out, in)`) and `b`, or
    `right_product(x, W)` with `W` `(in, out)`: a linear map written in `forward` (`x @ W.T`,
    `F.linear(x, W, b)`, `x @ W`; `_param_linear.py` rewrites the forms)."""
    x, w_node, *rest = n.args
    bias_node = rest[0] if rest else None
    wname = prop.param_name(w_node)
    bname = prop.param_name(bias_node) if bias_node is not None else None
    if n.kwargs or wname is None or (bias_node is not None and bname is None):
        raise Unsupported("linear map with computed weights or bias")
    out_axis = 0 if n.target is torch.ops.aten.linear.default else 1
    return _param_product(prop, n, x, wname, bname, out_axis, out)


def _param_product(
    prop: Propagator, n: fx.Node, x: Any, wname: str, bname: str | None, out_axis: int, out
) -> Pair:
    """A linear layer `x ↦ x W' + b` on the last axis of `x`, with the weight parameter
    `wname` holding its outputs on `out_axis` (1 for `(in, out)`, 0 for `(out, in)`)."""
    L = prop.L
    lab = prop.lab(x)
    if lab is None:
        raise Unsupported("matrix product of an unlabeled input")
    s, p = lab
    module = wname.rpartition(".")[0]
    in_axis = 1 - out_axis
    prop.use_param(wname, n.name)

    def along(v: Tensor, axis: int) -> Tensor:
        return v.reshape(-1, 1) if axis == 0 else v.reshape(1, -1)

    L.scale_terms.append((wname, along(scale_reps(L, s, -1), in_axis), -1))
    pcols = L.per_channel(p, -1)
    if all(len(c) <= 1 for c in pcols):
        ids = torch.tensor([int(c[0]) if len(c) else ZERO for c in pcols])
        L.perm_terms.append((wname, in_axis, ids))
    else:
        L.fix_perms(p, module or wname, "mixed channels into a matrix product")
    fresh = L.fresh(out.shape[-1], module or wname)
    L.scale_terms.append((wname, along(fresh, out_axis), 1))
    L.perm_terms.append((wname, out_axis, fresh))
    L.links.append((fresh, fresh))
    if bname is not None:
        prop.use_param(bname, n.name)
        L.scale_terms.append((bname, fresh, 1))
        L.perm_terms.append((bname, 0, fresh))
    lab = broadcast_channels(fresh, out.shape, -1)
    return lab, lab.clone()


def embedding(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """`nn.Embedding`: its rows are not analyzed here; recording the use lets a tied table be
    seen (and the embedding-sum pattern analyzes tables summed into a LayerNorm)."""
    name = str(n.target)
    prop.use_param(f"{name}.weight", name)
    return fixed(out)


def consecutive_linear(prop: Propagator, n: fx.Node, m: nn.Linear) -> None:
    """`B(A x)` with nothing between: `A ↦ G⁻¹A`, `B ↦ B G` for any invertible `G`. This
    contains the rescaling and permutations of `A`'s outputs, which are dropped."""
    L = prop.L
    prod = prop.sole_producer(n, (nn.Linear,))
    if prod is None:
        return
    a_name, a = prod
    b_name = str(n.target)
    r = a.out_features
    ids = L.ids_made_by({a_name})
    L.fix_scales(ids, b_name, "", quiet=True)
    L.fix_perms(ids, b_name, "", quiet=True)
    if a.bias is not None and m.bias is not None:
        # with both biases the states may also be shifted: the affine group GA(r)
        terms = (
            AffineTerm(f"{a_name}.weight", f"{a_name}.bias", "left"),
            AffineTerm(f"{b_name}.weight", f"{b_name}.bias", "right"),
        )
        L.extra.append(
            AffineFactor(f"affine:{a_name}+{b_name}", r, terms=terms, modules=(a_name, b_name))
        )
        return
    terms = [MatTerm(f"{a_name}.weight", 0, 0, "inv"), MatTerm(f"{b_name}.weight", 1, 0, "T")]
    if a.bias is not None:
        terms.insert(1, MatTerm(f"{a_name}.bias", 0, 0, "inv"))
    L.extra.append(
        GLFactor(f"gl:{a_name}+{b_name}", r, 1, terms=tuple(terms), modules=(a_name, b_name))
    )


# -- examples ---------------------------------------------------------------------------------
def _mlp() -> tuple[nn.Module, Any]:
    return seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))), batch(64, 3)


def _convs() -> tuple[nn.Module, Any]:
    model = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise
            nn.ReLU(),
            nn.Conv2d(4, 2, 1),
        )
    )
    return model, batch(48, 2, 5, 5)


class _Conv1D(nn.Module):
    """GPT-2's `Conv1D`: `addmm(b, x, W)` with `W` of shape `(in, out)`; the shape check in
    `forward` makes `torch.fx` fail, so the model is captured by `torch.export` (aten)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(4, 2))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError("expects (batch, 3)")
        h = torch.relu(torch.addmm(self.b1, x, self.w1))
        return torch.mm(h, self.w2)


class _ParamLinear(nn.Module):
    """A ReLU MLP written in `forward` on raw parameters: `relu(x @ W1.T + b1) @ W2.T`."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(2, 4))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.w1.T + self.b1) @ self.w2.T


def _transposed() -> tuple[nn.Module, Any]:
    model = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(3, 2, 2, stride=2),
            nn.ReLU(),
            nn.Conv2d(2, 2, 3, padding=1),
        )
    )
    return model, batch(32, 2, 4, 4)


RULES = (
    Rule(
        "transposed conv",
        "linear",
        conv_transpose,
        (
            Example(
                _transposed,
                5,
                "a scale per channel before the transposed convolution (3, through its "
                "input axis 0) and after it (2, through its output axis 1)",
            ),
        ),
        modules=CONV_T,
    ),
    Rule(
        "linear",
        "linear",
        linear,
        (Example(_mlp, 4, "one positive scale per hidden unit: 4"),),
        modules=(nn.Linear,),
    ),
    Rule(
        "conv",
        "linear",
        conv,
        (
            Example(
                _convs,
                8,
                "a scale per channel after the first convolution (4) and after the depthwise "
                "one (4); the depthwise one permits no permutation",
            ),
        ),
        modules=CONV,
    ),
    Rule(
        "parameter matrix product",
        "linear",
        matmul_param,
        (Example(lambda: (seeded(_Conv1D), batch(64, 3)), 4, "one scale per hidden unit: 4"),),
        functions=(torch.ops.aten.addmm.default, torch.ops.aten.mm.default),
    ),
    Rule(
        "parameter linear map",
        "linear",
        linear_param,
        (Example(lambda: (seeded(_ParamLinear), batch(64, 3)), 4, "one scale per hidden unit: 4"),),
        functions=(torch.ops.aten.linear.default, right_product),
    ),
    Rule(
        "embedding",
        "linear",
        embedding,
        (
            Example(
                lambda: (seeded(lambda: nn.Embedding(6, 4)), token_ids(6, 4, 5)),
                0,
                "the looked-up rows are the outputs: nothing is free",
            ),
        ),
        modules=(nn.Embedding,),
    ),
)
