"""What every rule handler shares: label pairs, refusals, broadcasting channel ids."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._labels import ZERO, Labels

__all__ = [
    "Pair",
    "Unsupported",
    "broadcast_channels",
    "fixed",
    "is_float",
    "scale_reps",
]

Pair = tuple[Tensor, Tensor]  # (scale labels, perm labels)


class Unsupported(Exception):
    """Raised by a handler that cannot follow its node: every label reaching it is fixed."""


def fixed(v: Tensor) -> Pair:
    """Labels of a value nothing may rescale or permute."""
    z = torch.zeros(v.shape, dtype=torch.long)
    return z, z.clone()


def is_float(v: Any) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point()


def broadcast_channels(ids: Tensor, shape: torch.Size, axis: int) -> Tensor:
    """`(n,)` ids along `axis` of `shape`, repeated over the other axes."""
    view = [1] * len(shape)
    view[axis] = -1
    return ids.reshape(view).expand(shape).clone()


def scale_reps(L: Labels, s: Tensor, axis: int) -> Tensor:
    """`(channels,)`: per channel along `axis`, its scale ids merged into one (`ZERO` for a
    channel that is zero everywhere)."""
    cols = L.per_channel(s, axis)
    # one id: its own representative (no merge)
    return torch.tensor([c[0] if len(c) == 1 else L.union_all(c) if c else ZERO for c in cols])
