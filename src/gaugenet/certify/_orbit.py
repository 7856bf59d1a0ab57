"""The orthogonal projector onto the complement of a group's orbit tangents."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ..groups import GaugeGroup
from ._svd import svd

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
        if tangents.is_sparse:
            tangents = tangents.coalesce()
            (row, col), val = tangents.indices(), tangents.values()
        else:
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

    def basis(self) -> Tensor:
        """`(n, rank)`: an orthonormal basis of the orbit tangents (dense)."""
        if self.rank == 0:
            return torch.zeros(self.n, 0, dtype=torch.float64)
        u, s, _ = svd(self._tt.to_dense(), full_matrices=False)
        return u[:, : self.rank]

    def __call__(self, v: Tensor) -> Tensor:
        if self.rank == 0:
            return v
        for _ in range(2):
            v = v - self._tt @ (self._pinv @ (self._t @ v))
        return v


def orbit_projector(model: nn.Module, group: GaugeGroup) -> Orbit:
    """The `Orbit` of `group` at `model`; the tangents are taken one factor at a time and
    kept sparse, so only the largest factor's `(dim_f, n_params)` is ever dense."""
    n = sum(p.numel() for p in model.parameters())
    if group.dim == 0:
        return Orbit(torch.zeros(0, n, dtype=torch.float64))
    model = copy.deepcopy(model).double()
    rows, cols, vals, k = [], [], [], 0
    for f in group.factors:
        if f.discrete or f.dim == 0:
            continue
        try:
            t = GaugeGroup((f,), (), group.param_names).tangent(model)  # (dim_f, n_params)
        except (KeyError, RuntimeError, AttributeError) as err:
            raise GaugeError(
                f"the tangents of factor {f.name!r} cannot be taken on this model ({err!r}): "
                "is the group of this model?"
            ) from err
        if t.shape != (f.dim, n):
            raise GaugeError(
                f"the tangents of factor {f.name!r} have shape {tuple(t.shape)}, expected "
                f"({f.dim}, {n}): is the group of this model?"
            )
        r, c = t.nonzero(as_tuple=True)
        rows.append(r + k)
        cols.append(c)
        vals.append(t[r, c].double())
        k += f.dim
        del t
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse invariant checks are implicitly disabled"
        tangents = torch.sparse_coo_tensor(idx, torch.cat(vals), (k, n))
    return Orbit(tangents)
