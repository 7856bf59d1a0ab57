"""Pooling (max, average, Lp, adaptive) and resampling (`nn.Upsample`, `F.interpolate`:
nearest, linear, bilinear, bicubic, each linear within a channel): positions within a
channel are mixed, so their scales must agree; channels keep their ids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .._labels import FIXED
from .._ops import POOL_FUNCS, POOL_MODULES
from ._common import Pair, broadcast_channels, scale_reps
from ._examples import batch, seeded
from ._rule import Example, Rule

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["RULES"]


def pool(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    _, (s, p) = prop.first(n)
    node = str(n.target) if n.op == "call_module" else n.name
    reps = scale_reps(prop.L, s, 1)
    pcols = prop.L.per_channel(p, 1)
    if any(len(c) > 1 for c in pcols):
        prop.L.fix_perms(p, node, "pooling over mixed channels")
    pids = torch.tensor([int(c[0]) if len(c) == 1 else FIXED for c in pcols])
    return broadcast_channels(reps, out.shape, 1), broadcast_channels(pids, out.shape, 1)


def _cnn() -> tuple[nn.Module, Any]:
    model = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 1)
        )
    )
    return model, batch(16, 2, 4, 4)


def _upsampled() -> tuple[nn.Module, Any]:
    model = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Conv2d(3, 2, 1),
        )
    )
    return model, batch(16, 2, 3, 3)


_aten = torch.ops.aten
RESAMPLE_FUNCS = (
    F.interpolate,
    _aten.upsample_nearest1d.vec,
    _aten.upsample_nearest2d.vec,
    _aten.upsample_linear1d.vec,
    _aten.upsample_bilinear2d.vec,
    _aten.upsample_bicubic2d.vec,
)


RULES = (
    Rule(
        "resampling",
        "pooling",
        pool,
        (
            Example(
                _upsampled, 3, "one scale per channel of the first convolution, kept by upsampling"
            ),
        ),
        modules=(nn.Upsample,),
        functions=RESAMPLE_FUNCS,
    ),
    Rule(
        "pooling",
        "pooling",
        pool,
        (Example(_cnn, 3, "one scale per channel of the first convolution, kept by max-pooling"),),
        modules=POOL_MODULES,
        functions=tuple(POOL_FUNCS),
    ),
)
