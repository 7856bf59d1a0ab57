"""A singular value decomposition that does not give up where LAPACK's `gesdd` does.

torch's `gesdd` (MKL on this build) can fail to converge on matrices with many repeated
singular values, such as an orthonormal basis projected off an orbit, where every singular
value is `0` or `1`. The same matrix decomposes with numpy's LAPACK, or transposed; `svd`
tries those before it raises.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["svd"]


def svd(a: Tensor, full_matrices: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """`(U, S, Vh)` of `a` `(m, n)`, as `torch.linalg.svd(a, full_matrices)`: torch's, then
    numpy's on the CPU, then torch's of `aᵀ`, the first that converges. Raises torch's
    `LinAlgError` when none does."""
    try:
        return torch.linalg.svd(a, full_matrices=full_matrices)
    except torch.linalg.LinAlgError as first:
        error = first
    if a.ndim == 2 and not a.requires_grad:
        try:
            u, s, vh = np.linalg.svd(a.detach().cpu().numpy(), full_matrices=full_matrices)
        except np.linalg.LinAlgError:
            pass
        else:
            return tuple(torch.from_numpy(x).to(a.device, a.dtype) for x in (u, s, vh))  # type: ignore[return-value]
    try:
        u, s, vh = torch.linalg.svd(a.transpose(-1, -2), full_matrices=full_matrices)
    except torch.linalg.LinAlgError:
        raise error from None
    return vh.transpose(-1, -2), s, u.transpose(-1, -2)
