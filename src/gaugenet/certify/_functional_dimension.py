"""`functional_dimension`: the rank of the parameter-to-output Jacobian, in float64.

The functional dimension of a model on inputs `X` is the rank of
`J = ∂ f(θ; X) / ∂ θ` (all outputs on all inputs, stacked). Every continuous symmetry
direction lies in the kernel of `J`, so `n_params − rank J ≥ dim(symmetries)`; equality
means the symmetries explain every redundancy seen on `X`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ._gram import Algorithm, singular_values
from ._jacobian import FlatModel, flat_model, jacobian, jacobian_of

__all__ = ["FunctionalDimension", "functional_dimension", "jacobian", "singular_values"]


@dataclass(frozen=True)
class FunctionalDimension:
    """The rank of the Jacobian and how clearly it is separated.

    - `rank`: singular values above `rtol · σ_max`.
    - `n_params`, `n_outputs`: the Jacobian's shape is `(n_outputs, n_params)`.
    - `sigma_last`, `sigma_next`: the smallest kept and the largest dropped singular value.
    - `gap`: `sigma_last / sigma_next` (`inf` when nothing is dropped); a large gap means the
      rank does not depend on the tolerance.
    - `singular_values`: all of them, descending.
    - `algorithm`: how they were computed, `"gram"` or `"svd"` (see `singular_values`).
    """

    rank: int
    n_params: int
    n_outputs: int
    sigma_last: float
    sigma_next: float
    gap: float
    rtol: float
    singular_values: Tensor
    algorithm: str = "svd"


def functional_dimension(
    model: nn.Module, inputs: Any, *, rtol: float = 1e-9, algorithm: Algorithm = "auto"
) -> FunctionalDimension:
    """The functional dimension of `model` on `inputs`.

    **Arguments:**

    - `model`: any module; it is copied and evaluated in float64 (its mode is kept, so put
      BatchNorm in eval mode first).
    - `inputs`: a tensor or tuple of tensors (a batch). The outputs on them must number at
      least the parameters, else the rank cannot reach `n_params − dim(symmetries)` and a
      `GaugeError` says how many inputs are needed.
    - `rtol`: singular values below `rtol · σ_max` count as zero.
    - `algorithm`: how the singular values are computed (see `singular_values`): `"svd"`,
      `"gram"` (two-stage, faster for large Jacobians, same accuracy class), `"auto"`.

    **Returns:** a `FunctionalDimension` with the rank and the singular-value gap.
    """
    if not rtol > 0:
        raise GaugeError(f"rtol must be positive, got {rtol}")
    fm = flat_model(model, inputs)
    check_outputs(fm, inputs)
    return rank_of(jacobian_of(fm), rtol=rtol, algorithm=algorithm)


def check_outputs(fm: FlatModel, inputs: Any) -> int:
    """The number of outputs; a `GaugeError` saying how many inputs are needed when they do
    not outnumber the parameters."""
    n_params = fm.theta.numel()
    with torch.no_grad():
        n_out = fm.f(fm.theta).numel()
    if n_out <= n_params:
        raise GaugeError(
            f"the outputs on these inputs number {n_out}, not more than the {n_params} "
            "parameters: the Jacobian's rank is capped by the outputs; pass more inputs "
            f"(at least {n_params // max(1, n_out // max(1, _batch(inputs))) + 1} samples)"
        )
    return n_out


def rank_of(jac: Tensor, *, rtol: float, algorithm: Algorithm = "auto") -> FunctionalDimension:
    """`functional_dimension` of a Jacobian `(n_outputs, n_params)` already formed."""
    n_out, n_params = jac.shape
    s, used = singular_values(jac, algorithm=algorithm)
    rank = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    last = float(s[rank - 1]) if rank else 0.0
    nxt = float(s[rank]) if rank < s.numel() else 0.0
    gap = last / nxt if nxt > 0 else float("inf")
    return FunctionalDimension(rank, n_params, n_out, last, nxt, gap, rtol, s, used)


def _batch(inputs: Any) -> int:
    x = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    return int(x.shape[0]) if isinstance(x, Tensor) and x.ndim else 1
