"""Public verification helpers: how far two models are from computing the same function."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import GaugeError
from ._float64_kernels import float64_kernels
from ._tolerances import model_dtype

__all__ = [
    "DEFAULT_TOLERANCES",
    "assert_invariant",
    "exact_invariance_error",
    "invariance_error",
    "relative_error",
]

#: largest relative change of a model's float64 outputs when its casts down are kept in
#: float64 for which it still counts as computing the same function (float32's `√ε`)
SAME_FUNCTION = 1e-4

#: Relative tolerances used by `assert_invariant` when none is given.
DEFAULT_TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def _flat_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for _, v in out.items() for t in _flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_outputs(v)]
    return []


def relative_error(a: Tensor, b: Tensor) -> float:
    """`max|a - b| / max(max|b|, tiny)`, computed in float64."""
    if a.shape != b.shape:
        raise GaugeError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.detach().double(), b.detach().double()
    scale = b64.abs().max().clamp_min(1e-300) if b64.numel() else torch.tensor(1.0)
    return float((a64 - b64).abs().max() / scale) if a64.numel() else 0.0


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def cast_floats(x: Any, dtype: torch.dtype | None) -> Any:
    """`x` with every floating tensor in it (alone, or in dicts, tuples and lists) cast to
    `dtype`; other values as they are. `dtype=None` leaves everything."""
    if isinstance(x, Tensor):
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: cast_floats(v, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(cast_floats(v, dtype) for v in x)
    return x


def _run(model: nn.Module, inputs: Sequence[Any], dtype: torch.dtype | None) -> list[Tensor]:
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    args = [cast_floats(x, dtype) for x in inputs]
    with torch.no_grad(), float64_kernels():
        if len(args) == 1 and isinstance(args[0], dict):
            out = model(**args[0])
        else:
            out = model(*args)
    return _flat_outputs(out)


def invariance_error(
    model_a: nn.Module,
    model_b: nn.Module,
    inputs: Any,
    *,
    dtype: torch.dtype | None = torch.float64,
) -> float:
    """The largest relative output difference between two models on `inputs`.

    **Arguments:**

    - `model_a`, `model_b`: the two models; neither is modified (float64 copies are run).
    - `inputs`: one input tensor, a tuple of positional inputs, or a dict of keyword inputs.
    - `dtype`: the precision to compare in (`None`: the models' own).

    **Returns:** `max over outputs of max|out_a - out_b| / max|out_b|`.
    """
    args = _as_tuple(inputs)
    outs_a, outs_b = _run(model_a, args, dtype), _run(model_b, args, dtype)
    if len(outs_a) != len(outs_b):
        raise GaugeError(f"models return {len(outs_a)} and {len(outs_b)} tensors")
    if not outs_a:
        raise GaugeError("the models returned no tensor outputs to compare")
    return max(relative_error(a, b) for a, b in zip(outs_a, outs_b))


def exact_invariance_error(model_a: nn.Module, model_b: nn.Module, inputs: Any) -> float:
    """`invariance_error` in float64, with the models' casts down kept in float64.

    Many models compute part of their work in float32 whatever their dtype (GPT-Neo's
    attention scores, a softmax with `dtype=torch.float32`, an RMSNorm variance): in float64
    copies that rounding, about `1e-7`, hides whether two models compute the same function.
    Here both run inside `keep_float64` (casts of float64 tensors to a lower precision are
    dropped) when `model_a` then runs and its outputs move by less than `SAME_FUNCTION`
    (relative); otherwise (the model fails, or computes something else) as they are.

    **Returns:** `max over outputs of max|out_a - out_b| / max|out_b|`, float64.
    """
    from .discovery._float64 import keep_float64

    args = _as_tuple(inputs)
    plain = _run(model_a, args, torch.float64)
    try:
        with keep_float64():
            wide = _run(model_a, args, torch.float64)
    except Exception:  # the model does not run with its casts kept: as it is
        wide = None
    same = (
        wide is not None
        and len(wide) == len(plain)
        and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(wide, plain))
        and max((relative_error(a, b) for a, b in zip(wide, plain)), default=0.0) < SAME_FUNCTION
    )
    if not same:
        return invariance_error(model_a, model_b, inputs)
    with keep_float64():
        return invariance_error(model_a, model_b, inputs)


def assert_invariant(
    model_a: nn.Module,
    model_b: nn.Module,
    inputs: Any,
    *,
    dtype: torch.dtype = torch.float64,
    tol: float | None = None,
) -> float:
    """Raise `AssertionError` unless `invariance_error(...) <= tol`.

    The default `tol` follows the dtypes (see `DEFAULT_TOLERANCES`): that of the comparison
    `dtype`, or of the models' weights when these are less precise (two float32 models
    compared in float64 still differ by float32 rounding). Returns the error.
    """
    if tol is None:
        dtypes = (dtype, model_dtype(model_a), model_dtype(model_b))
        missing = [d for d in dtypes if d not in DEFAULT_TOLERANCES]
        if missing:
            raise GaugeError(f"no default tolerance for {missing[0]}: pass tol explicitly")
        tol = max(DEFAULT_TOLERANCES[d] for d in dtypes)
    err = invariance_error(model_a, model_b, inputs, dtype=dtype)
    if not err <= tol:
        raise AssertionError(f"relative output difference {err:.3e} exceeds {tol:.1e} ({dtype})")
    return err
