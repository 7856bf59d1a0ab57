"""Memory estimates of the certification methods, made before any of them starts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._jacobian import FlatModel, measuring

__all__ = ["Sizes", "activation_bytes", "estimates"]

_F64 = 8
#: Davidson subspace (vectors, each with its product) of `matrix_free_certificate`
_DAVIDSON = 48


@dataclass(frozen=True)
class Sizes:
    """What the estimates depend on: parameters, outputs, the group's dimension and its
    largest factor, and the bytes of one forward pass's intermediate results (float64)."""

    n_params: int
    n_outputs: int
    dim: int
    largest_factor: int
    activations: int
    #: the share of the batch the tangent check runs on (large models: 2 samples)
    check_share: float = 1.0


def activation_bytes(fm: FlatModel) -> int:
    """Bytes of every module's output in one float64 forward pass on the inputs (what
    autograd keeps for a backward pass, roughly), measured with forward hooks."""
    total = 0

    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        nonlocal total
        stack = [out]
        while stack:
            o = stack.pop()
            if isinstance(o, Tensor):
                total += o.numel() * o.element_size()
            elif isinstance(o, (tuple, list)):
                stack += list(o)
            elif isinstance(o, dict) or hasattr(o, "values"):
                stack += list(o.values())

    hooks = [m.register_forward_hook(hook) for m in fm.model.modules()]
    try:
        with torch.no_grad(), measuring():
            fm.model(*fm.args)
    finally:
        for h in hooks:
            h.remove()
    return total


def estimates(s: Sizes) -> dict[str, int]:
    """Peak bytes of each method, beyond the caller's own model, from `s`:

    - `"checks"` (always run): eight parameter vectors (the float64 copy and its flat
      vector, the state acted on, a tangent probe with its primal and concatenations,
      the power-iteration vectors), one forward pass's outputs on the whole batch (the
      act check, without gradients: the sum over modules bounds its peak) and four on
      the share of the batch the tangent check runs on (forward- and reverse-mode tapes).
    - `"exact"`: the checks, the Jacobian `(n_outputs, n_params)` twice (per-sample rows and
      their reshape), and three `(n, n)` matrices for the singular values (`n` the smaller
      side: Gram matrix, its Cholesky factor, a shifted copy).
    - `"matrix-free"`: the checks, the Davidson subspace (48 vectors and their products),
      the dense tangents of the largest factor (built one factor at a time), the orbit
      tangents in sparse form (three copies; about `2 + √largest` generators touch one
      weight entry, as in a GL factor of `GL(d)` acting on a row), the
      pseudo-inverse of their Gram matrix (three `(dim, dim)`) and the products' tapes.
    """
    n, m = s.n_params, s.n_outputs
    base = 8 * n * _F64 + s.activations + int(4 * s.activations * s.check_share)
    small = min(n, m)
    exact = base + 2 * m * n * _F64 + 3 * small * small * _F64
    per_entry = 2 + int(s.largest_factor**0.5)  # generators touching one weight entry
    sparse = 3 * min(s.dim * n, per_entry * n) * 2 * _F64
    mf = (
        base
        + 2 * _DAVIDSON * n * _F64
        + s.largest_factor * n * _F64
        + sparse
        + 3 * s.dim * s.dim * _F64
        + 6 * s.activations
    )
    return {"checks": base, "exact": exact, "matrix-free": mf}
