"""Views and reshapes, indexing, concatenation, padding, casts, and shape queries: labels
move with the values (the same view applied to the label maps)."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .._labels import ZERO
from .._ops import CAST_METHODS, CASTS, DTYPE_CASTS, METADATA_OPS, VIEW_FUNCS, VIEW_METHODS
from ._common import Pair, Unsupported, fixed
from ._examples import batch, seeded
from ._rule import Example, Rule

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["RULES"]


def _on_labels(prop: Propagator, n: fx.Node, s: Tensor, p: Tensor) -> tuple[Any, Any]:
    """The node's own operation (module, method or function, with its other arguments)
    applied to the label maps `s` and `p` instead of the values."""
    if n.op == "call_module":
        m = prop.submodule(n)
        return m(s), m(p)
    args = [prop.env[a] if isinstance(a, fx.Node) else a for a in n.args[1:]]
    kwargs = {k: prop.env[v] if isinstance(v, fx.Node) else v for k, v in n.kwargs.items()}
    if n.op == "call_method":
        return getattr(s, n.target)(*args, **kwargs), getattr(p, n.target)(*args, **kwargs)
    return n.target(s, *args, **kwargs), n.target(p, *args, **kwargs)


def view(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """The same view of the label maps (`nn.Flatten`, `x.view(...)`, `torch.permute`, ...)."""
    _, (s, p) = prop.first(n)
    return _on_labels(prop, n, s, p)


def passthrough(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """Casts and copies: the values, and so every label, pass through unchanged."""
    _, (s, p) = prop.first(n)
    return s, p


def getitem(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    _, (s, p) = prop.first(n)
    # the index as it was run: nodes inside it (a slice bound `x.shape[1]` that `torch.fx`
    # records) replaced by their values
    idx = fx.node.map_arg(n.args[1], lambda a: prop.env[a])
    return s[idx], p[idx]


def split(prop: Propagator, n: fx.Node, out: Any) -> tuple[list[Tensor], list[Tensor]]:
    """`torch.split`, `chunk`, `unbind`, `tensor_split`: each part keeps the labels of its
    entries (the same split of the label maps), as lists that `getitem` picks from; a
    packed projection (`gate_up_proj`) split in two keeps each half's scales."""
    _, (s, p) = prop.first(n)
    parts = _on_labels(prop, n, s, p)
    if len(parts[0]) != len(out) or any(a.shape != b.shape for a, b in zip(parts[0], out)):
        raise Unsupported(f"{n.name}: the parts of the labels do not match the values")
    return list(parts[0]), list(parts[1])


def cat(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """Concatenation: each part keeps its labels (an unlabeled part is fixed)."""
    parts = n.args[0]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    labs = []
    for a in parts:
        lab = prop.lab(a)
        if lab is None:
            lab = fixed(prop.env[a])
        labs.append(lab)
    return torch.cat([x[0] for x in labs], dim), torch.cat([x[1] for x in labs], dim)


def pad(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """Padding with zeros keeps every scale; with another constant it fixes them."""
    _, (s, p) = prop.first(n)
    pad = n.args[1] if len(n.args) > 1 else n.kwargs["pad"]
    mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
    value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else None)
    if mode != "constant":
        raise Unsupported(f"padding mode {mode!r} is not analyzed")
    if value not in (None, 0, 0.0):
        prop.L.fix_scales(s, n.name, f"padding with the constant {value} is not homogeneous")
    return F.pad(s, pad, value=ZERO), F.pad(p, pad, value=ZERO)


def shape_query(prop: Propagator, n: fx.Node, out: Any) -> Any:
    """Shapes and metadata: a non-tensor result needs no labels (it is never passed to the
    handler); a floating one is not analyzed."""
    return prop.unknown(n)


# -- examples ---------------------------------------------------------------------------------
def _flatten() -> tuple[nn.Module, Any]:
    model = seeded(
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    )
    return model, batch(64, 1, 4, 4)


class _Pick(nn.Module):
    """Two branches concatenated, a zero token padded in front, then the first real token."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], -1)
        return self.out(F.pad(h, (0, 0, 1, 0))[:, 1])


class _PackedGLU(nn.Module):
    """A gated MLP whose gate and up projections are one packed linear map, split in two."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up, self.down = nn.Linear(3, 8), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class _Unbound(nn.Module):
    """Per-position maps of a sequence taken apart with `unbind` and added back."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        first, second = torch.relu(self.a(x)).unbind(1)
        return self.out(first + second)


class _Shaped(nn.Module):
    """Reads its batch size, then a view and a transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x)).view(x.size(0), 2, 3).transpose(1, 2).contiguous()
        return self.out(h.transpose(1, 2).reshape(x.size(0), -1))


class _TypeAs(nn.Module):
    """A hidden layer cast to its input's dtype (`h.type_as(x)`, as Gemma's RMSNorm ends)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.a(x)).type_as(x))


class _CastMethods(nn.Module):
    """Casts and a copy written as tensor methods between two layers, as `torch.fx` records
    them (`call_method` nodes: `.double()`, `.to(dtype)`, `.clone()`)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x)).double().to(x.dtype).clone()
        return self.out(h)


class _Cast(nn.Module):
    """A cast and a copy between two layers; `torch.fx` fails on the shape check, so the
    model is captured by `torch.export` (casts and copies as aten operations)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError("expects (batch, 3)")
        h = torch.relu(self.a(x)).to(x.dtype).clone()
        return self.out(h)


RULES = (
    Rule(
        "view",
        "views",
        view,
        (
            Example(_flatten, 2, "one scale per convolution channel, read through Flatten"),
            Example(lambda: (seeded(_Shaped), batch(64, 4)), 6, "one scale per hidden unit"),
        ),
        modules=(nn.Flatten, nn.Unflatten),
        functions=tuple(VIEW_FUNCS),
        methods=tuple(VIEW_METHODS),
    ),
    Rule(
        "getitem",
        "views",
        getitem,
        (
            Example(
                lambda: (seeded(_Pick), batch(64, 3, 3)),
                4,
                "one scale per hidden unit of both branches (concatenated, zero-padded, one "
                "token picked): 4",
            ),
        ),
        functions=(operator.getitem,),
        methods=("__getitem__",),
    ),
    Rule(
        "split",
        "views",
        split,
        (
            Example(
                lambda: (seeded(_PackedGLU), batch(64, 3)),
                4,
                "the up half of the packed projection: one scale per unit (4; the gate half "
                "feeds SiLU, which is not homogeneous)",
            ),
            Example(
                lambda: (seeded(_Unbound), batch(64, 2, 3)),
                4,
                "one scale per ReLU unit, shared by both positions: 4",
            ),
        ),
        functions=(torch.split, torch.chunk, torch.unbind, torch.tensor_split),
        methods=("split", "chunk", "unbind", "tensor_split"),
        several_outputs=True,
    ),
    Rule(
        "cat",
        "views",
        cat,
        (Example(lambda: (seeded(_Pick), batch(64, 3, 3)), 4, "as for getitem: 4"),),
        functions=(torch.cat,),
    ),
    Rule(
        "pad",
        "views",
        pad,
        (Example(lambda: (seeded(_Pick), batch(64, 3, 3)), 4, "as for getitem: 4"),),
        functions=(F.pad,),
    ),
    Rule(
        "casts and copies",
        "views",
        passthrough,
        (Example(lambda: (seeded(_Cast), batch(64, 3)), 4, "one scale per hidden unit: 4"),),
        functions=tuple(CASTS),
    ),
    Rule(
        "casts and copies written as methods",
        "views",
        passthrough,
        (Example(lambda: (seeded(_CastMethods), batch(64, 3)), 4, "one scale per hidden unit: 4"),),
        methods=CAST_METHODS,
    ),
    Rule(
        "cast to another tensor's dtype",
        "views",
        passthrough,
        (
            Example(
                lambda: (seeded(_TypeAs), batch(64, 3)),
                4,
                "one scale per hidden unit (the dtype's tensor is not read): 4",
            ),
        ),
        functions=tuple(DTYPE_CASTS),
        methods=("type_as",),
    ),
    Rule(
        "shape queries",
        "views",
        shape_query,
        (Example(lambda: (seeded(_Shaped), batch(64, 4)), 6, "one scale per hidden unit: 6"),),
        functions=(
            getattr,
            torch.numel,
            torch.ops.aten.sym_size.int,
            torch.ops.aten.sym_numel,
            *METADATA_OPS,
        ),
        methods=("size", "dim", "numel", "type", "get_device"),
        label_free=True,
    ),
)
