"""`GL` between a convolution and the convolution that reads it through a concatenation.

A convolution (transposed or not, `groups = 1`, with or without a bias) whose output goes
only into one channel concatenation, itself read only by a convolution (`groups = 1`), is a
pair of linear maps with nothing between them on its channels (a U-Net's up-convolution
joined to the skip connection): the concatenation's other parts keep their channels, so
`W ↦ G⁻¹ W`, `b ↦ G⁻¹ b` on the first and `V ↦ V G` on the reader's columns of that slice
change nothing, for any invertible `G` (`GLFactor`). It contains the rescalings and
permutations of those channels, which are fixed in the labels before the factors are built.
(No shift: a padded reader does not take a constant back at the borders.)
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from ..groups import GLFactor, MatTerm
from ._ops import graph_users

__all__ = ["concat_gls"]

_CAT = {torch.cat, torch.concat, torch.ops.aten.cat.default}


def _module(root: nn.Module, n: object) -> nn.Module | None:
    if isinstance(n, fx.Node) and n.op == "call_module":
        return root.get_submodule(str(n.target))
    return None


def _conv(m: object, transposed: bool) -> bool:
    """An ungrouped convolution (a transposed one too, when `transposed`)."""
    if not isinstance(m, nn.modules.conv._ConvNd) or m.groups != 1:
        return False
    return transposed or not isinstance(m, nn.modules.conv._ConvTransposeNd)


def _cat_dim(u: fx.Node, ndim: int) -> int | None:
    if u.op != "call_function" or u.target not in _CAT:
        return None
    dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
    return dim % ndim if isinstance(dim, int) else None


def concat_gls(gm: fx.GraphModule, root: nn.Module, prop) -> list[GLFactor]:
    """One `GLFactor` per convolution read only through a channel concatenation by one
    convolution (see the module docstring); fixes the labels of its output channels."""
    out = []
    for n in gm.graph.nodes:
        m = _module(root, n)
        value = prop.values.get(n)
        if not _conv(m, True) or not isinstance(value, Tensor) or len(graph_users(n)) != 1:
            continue
        (u,) = graph_users(n)
        parts = u.args[0] if u.args else None
        if _cat_dim(u, value.ndim) != 1 or not isinstance(parts, (list, tuple)):
            continue
        if sum(p is n for p in parts) != 1 or len(graph_users(u)) != 1:
            continue
        (r,) = graph_users(u)
        reader = _module(root, r)
        if not _conv(reader, False) or r.args[0] is not u or len(r.args) != 1:
            continue
        offset = 0
        for p in parts:
            if p is n:
                break
            offset += prop.values[p].shape[1]
        name, rname = str(n.target), str(r.target)
        axis = 1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0
        terms = [MatTerm(f"{name}.weight", axis, 0, "inv")]
        if m.bias is not None:
            terms.append(MatTerm(f"{name}.bias", 0, 0, "inv"))
        terms.append(MatTerm(f"{rname}.weight", 1, offset, "T"))
        c = value.shape[1]
        out.append(GLFactor(f"gl:{name}+{rname}", c, 1, terms=tuple(terms), modules=(name, rname)))
        lab = prop.carried(n)
        if lab is not None:
            prop.L.fix_scales(lab[0], "", "", quiet=True)
            prop.L.fix_perms(lab[1], "", "", quiet=True)
    return out
