"""Whether two factors are the same transformation: a layer applied several times with one
set of weights (ALBERT's shared layer) has its factors derived once per application."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..groups import Breaker

__all__ = ["by_name", "same_factor", "shared_cores"]


def same_factor(a: Any, b: Any) -> bool:
    """`a` and `b` are equal: dataclasses field by field, tensors entry by entry (shape and
    dtype too), tuples, lists and dicts item by item, anything else by `==`."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            same_factor(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_factor, a, b))
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_factor(a[k], b[k]) for k in a)
        )
    return type(a) is type(b) and a == b


def by_name(factors: list) -> dict[str, list]:
    """The factors grouped by name, in order of first appearance."""
    out: dict[str, list] = {}
    for f in factors:
        out.setdefault(f.name, []).append(f)
    return out


def shared_cores(factors: list) -> tuple[list, list[Breaker]]:
    """One factor per name: a layer applied several times (ALBERT's shared layers, a
    recurrent block) gives one core per application, all with the same projections, whose
    factors are then the same transformation of the same weights: a symmetry of every
    application at once, kept once. Factors of one name that differ (the same projections
    read through different maps) are all dropped, with a breaker."""
    out, breakers = [], []
    for name, fs in by_name(factors).items():
        if all(same_factor(fs[0], f) for f in fs[1:]):
            out.append(fs[0])
        else:
            why = "attention cores sharing their projections give different factors"
            breakers.append(Breaker(name, f"{why}: not offered"))
    return out, breakers
