"""Tolerances that follow the dtype of the weights.

A gauge transformation is exact in exact arithmetic; in floating point the transformed
weights are rounded to the model's dtype, and depth amplifies that rounding. Checks on a
float32 model therefore cannot use float64's tolerances (float32 holds 7 digits): every
check in gaugenet picks its tolerance from the least precise floating dtype of the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ._errors import GaugeError

__all__ = [
    "DRIFT_TOLERANCES",
    "WEIGHT_TOLERANCES",
    "drift_tolerance",
    "model_dtype",
    "param_dtype",
    "weight_tolerance",
]

#: Largest relative output change (max over outputs of `max|Δy| / max|y|`) a gauge
#: transformation may cause on a model whose weights have this dtype.
DRIFT_TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

#: Largest relative difference (to the largest weight) between the canonical weights of two
#: models that are called gauge-equivalent (`gaugenet.align`).
WEIGHT_TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def model_dtype(model: nn.Module) -> torch.dtype:
    """The least precise floating dtype among `model`'s parameters (float64 if none)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float64)


def param_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of `model`'s first floating parameter (`None` if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _lookup(table: dict[torch.dtype, float], dtype: torch.dtype, what: str) -> float:
    try:
        return table[dtype]
    except KeyError:
        raise GaugeError(
            f"no {what} tolerance for dtype {dtype}: use one of {sorted(map(str, table))} "
            "or pass the tolerance explicitly"
        ) from None


def drift_tolerance(dtype: torch.dtype) -> float:
    """The default bound on the relative output change of a gauge transformation."""
    return _lookup(DRIFT_TOLERANCES, dtype, "output-drift")


def weight_tolerance(dtype: torch.dtype) -> float:
    """The default bound on the relative difference of canonical weights."""
    return _lookup(WEIGHT_TOLERANCES, dtype, "weight")
