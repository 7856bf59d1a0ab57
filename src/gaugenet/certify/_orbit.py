"""The orthogonal projector onto the complement of a group's orbit tangents."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ..groups import GaugeGroup

__all__ = ["Orbit", "orbit_projector"]


class Orbit:
    """The orthogonal projector `P = 1 − Q Qᵀ` onto the complement of the orbit tangents,
    kept as the (usually very sparse) tangents `T` `(dim, n)` in CSR form and the
    pseudo-inverse of their Gram matrix: `P v = v − Tᵀ (T Tᵀ)⁺ T v`, applied twice for
    accuracy."""

    def __init__(self, tangents: Tensor) -> None:
        self.dim, self.n = tangents.shape
        self.rank = 0
        if self.dim == 0:
            return
        row, col = tangents.nonzero(as_tuple=True)
        val = tangents[row, col]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            coo = torch.sparse_coo_tensor(torch.stack([row, col]), val, tangents.shape)
            self._t = coo.to_sparse_csr()
            self._tt = coo.t().coalesce().to_sparse_csr()
            gram = (self._t @ self._tt).to_dense()
        d, u = torch.linalg.eigh((gram + gram.T) / 2)
        keep = d > 1e-12 * d.max()
        self.rank = int(keep.sum())
        self._pinv = (u[:, keep] / d[keep]) @ u[:, keep].T

    def __call__(self, v: Tensor) -> Tensor:
        if self.rank == 0:
            return v
        for _ in range(2):
            v = v - self._tt @ (self._pinv @ (self._t @ v))
        return v


def orbit_projector(model: nn.Module, group: GaugeGroup) -> Orbit:
    n = sum(p.numel() for p in model.parameters())
    if group.dim == 0:
        return Orbit(torch.zeros(0, n, dtype=torch.float64))
    try:
        tangents = group.tangent(copy.deepcopy(model).double())  # (dim, n_params)
    except (KeyError, RuntimeError, AttributeError) as err:
        raise GaugeError(
            f"the group's tangents cannot be taken on this model ({err!r}): is "
            "the group of this model?"
        ) from err
    if tangents.shape != (group.dim, n):
        raise GaugeError(
            f"the group's tangents have shape {tuple(tangents.shape)}, expected "
            f"({group.dim}, {n}): is the group of this model?"
        )
    return Orbit(tangents.double())
