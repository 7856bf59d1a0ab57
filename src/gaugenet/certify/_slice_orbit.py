"""The orbit tangents inside a slice: `dim(span T ∩ ℝ^S)`, the redundancy on the slice's
entries that the group explains, with `T` the rows of every continuous factor's tangents.

Taken locally, never from the whole `T` (216 134 rows on MiniLM): let `R` be the tangent rows
that touch `S` (rows `e_k` of a factor's algebra whose tangent has an entry in `S`), the
others `R'` (zero on `S`). An element of `span T ∩ ℝ^S` is `T_Rᵀ a + T_R'ᵀ b`, zero off `S`;
its entries in `S` are `T_{R,S}ᵀ a`. Hence the bounds

- *lower*: `dim{T_{R,S}ᵀ a : T_{R,S^c}ᵀ a = 0}` (`b = 0`: `span T_R ∩ ℝ^S`), and
- *upper*: `dim{T_{R,S}ᵀ a : T_{R,C}ᵀ a = 0}`, `C` the entries outside `S` that no row of
  `R'` touches (there `T_R'ᵀ b` is zero, so `a` alone must cancel),

equal whenever the rows of `R` own their entries outside `S` (`C` is all of them), which a
slice holding the whole supports of the orbits it samples arranges. The rows of `R` are
found from each factor's tangents, formed row by row (forward mode over the factor's
algebra on the parameters it writes), and so are the entries `R'` touches.

The dimensions are counted on rows scaled to unit norm: a combination `a` counts as
cancelling on a set of entries when the Gram matrix of the rows there has `aᵀ G a` under
`_NULL` (`‖T_Xᵀ a‖ ≤ 10⁻⁷`), and the vectors `T_{R,S}ᵀ a` span a dimension by their singular
values above `_RANK`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..groups import GaugeGroup, model_state
from ..groups._base import AbstractFactor
from ._jacobian import FlatModel
from ._slice import Slice
from ._svd import svd

__all__ = ["SliceOrbit", "slice_orbit"]

#: eigenvalues of the Gram matrix (unit rows) under this are a cancelling combination
_NULL = 1e-14
#: singular values of the combinations' entries in `S` above this span a dimension
_RANK = 1e-7
#: directions of a factor's algebra formed at once
_CHUNK = 128
#: times the rows `R` grow by the rows touching their entries, while at most `_MAX_ROWS`
_ROUNDS = 2
_MAX_ROWS = 4096


@dataclass(frozen=True)
class SliceOrbit:
    """The orbit tangents inside a slice.

    - `lower`, `upper`: bounds on `dim(span T ∩ ℝ^S)` (see the module); equal when exact.
    - `basis`: `(|S|, lower)` an orthonormal basis of `span T_R ∩ ℝ^S` in the slice's entries.
    - `rows`: how many tangent rows touch the slice; `factors`: the factors they belong to.
    - `shared`: entries outside `S` of those rows that other rows touch too (`0` means exact).
    """

    lower: int
    upper: int
    basis: Tensor
    rows: int
    factors: tuple[str, ...]
    shared: int

    @property
    def exact(self) -> bool:
        return self.lower == self.upper


def _written(
    group: GaugeGroup, f: AbstractFactor, fm: FlatModel, state: dict
) -> tuple[GaugeGroup, list[str]]:
    one = GaugeGroup((f,), (), group.param_names)
    zero = torch.zeros(f.dim, dtype=torch.float64)
    trial = one.act_state(state, {f.name: f.exp(zero)}, validate=False)
    return one, [n for n in fm.names if trial[n] is not state[n]]


def _tangent_map(one: GaugeGroup, f: AbstractFactor, written: list[str], state: dict):
    """`z ↦ Tᵀ z` on the written parameters, flattened and joined: `(dim_f,) → (m,)`."""

    def part(xi: Tensor) -> Tensor:
        new = one.act_state(state, {f.name: f.exp(xi)}, validate=False)
        return torch.cat([new[n].reshape(-1) for n in written])

    zero = torch.zeros(f.dim, dtype=torch.float64)
    return lambda z: torch.func.jvp(part, (zero,), (z,))[1]


def _gram(rows: Tensor, cols: Tensor, keep: Tensor, n_rows: int) -> Tensor:
    """The dense Gram matrix of the sparse rows (`rows`, `cols`, values `keep`)."""
    idx = torch.stack([rows, cols])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        n = int(cols.max()) + 1 if cols.numel() else 1
        m = torch.sparse_coo_tensor(idx, keep, (n_rows, n)).coalesce()
        return (m.to_sparse_csr() @ m.t().coalesce().to_sparse_csr()).to_dense()


def _inside(a_s: Tensor, gram: Tensor) -> tuple[int, Tensor]:
    """The dimension and an orthonormal basis `(|S|, d)` of `{A_Sᵀ a : aᵀ G a ≈ 0}`."""
    if gram.numel():
        d, u = torch.linalg.eigh((gram + gram.T) / 2)
        null = u[:, d <= _NULL]
    else:
        null = torch.eye(a_s.shape[0], dtype=a_s.dtype)
    v = null.T @ a_s  # (k, |S|)
    if v.numel() == 0:
        return 0, a_s.new_zeros(a_s.shape[1], 0)
    _, s, vh = svd(v, full_matrices=False)
    k = int((s > _RANK).sum())
    return k, vh[:k].T.contiguous()


def _sparse_rows(apply, dim: int, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every row of a factor's tangents, sparse: `(row, column, value)` with the columns in
    the model's flat parameter vector."""
    eye = torch.eye(dim, dtype=torch.float64)
    rows, cs, vals = [], [], []
    for a in range(0, dim, _CHUNK):
        block = torch.func.vmap(apply)(eye[a : a + _CHUNK])
        r, c = block.nonzero(as_tuple=True)
        rows.append(r + a)
        cs.append(cols[c])
        vals.append(block[r, c])
    return torch.cat(rows), torch.cat(cs), torch.cat(vals)


def slice_orbit(fm: FlatModel, group: GaugeGroup, sl: Slice) -> SliceOrbit:
    """The `SliceOrbit` of the continuous factors of `group` at `fm.model` on `sl`.

    `R` starts as the rows touching `S` and grows, up to `_ROUNDS` times while it has at
    most `_MAX_ROWS` rows, by the rows touching its own entries: the lower bound stays a
    lower bound, and the upper one tightens as the entries outside `S` that rows outside
    `R` touch become fewer."""
    n = fm.theta.numel()
    state = model_state(fm.model)
    starts = fm.offsets()
    in_s = torch.zeros(n, dtype=torch.bool)
    in_s[sl.columns] = True
    where = torch.full((n,), -1, dtype=torch.long)
    where[sl.columns] = torch.arange(sl.size)
    factors = []
    for f in group.factors:
        if f.discrete or f.dim == 0:
            continue
        one, written = _written(group, f, fm, state)
        if written:
            cols = torch.cat([starts[w] + torch.arange(state[w].numel()) for w in written])
            factors.append((f, _tangent_map(one, f, written, state), cols))
    cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def rows_of(i: int) -> tuple[Tensor, Tensor, Tensor]:
        f, apply, cols = factors[i]
        if f.name not in cache:
            cache[f.name] = _sparse_rows(apply, f.dim, cols)
        return cache[f.name]

    def touching(x: Tensor) -> dict[int, Tensor]:
        """Per factor (index) whose entries meet `x`, its rows `(dim_f,)` touching `x`."""
        out = {}
        for i, (f, _, cols) in enumerate(factors):
            if x[cols].any():
                r, c, _ = rows_of(i)
                touch = torch.zeros(f.dim, dtype=torch.bool)
                touch[r[x[c]]] = True
                if touch.any():
                    out[i] = touch
        return out

    chosen = touching(in_s)
    for _ in range(_ROUNDS):
        if sum(int(t.sum()) for t in chosen.values()) > _MAX_ROWS:
            break
        reach = in_s.clone()
        for i, t in chosen.items():
            r, c, _ = rows_of(i)
            reach[c[t[r]]] = True
        grown = touching(reach)
        if grown.keys() == chosen.keys() and all(torch.equal(grown[i], chosen[i]) for i in grown):
            break
        chosen = grown
    if not chosen:
        return SliceOrbit(0, 0, torch.zeros(sl.size, 0, dtype=torch.float64), 0, (), 0)
    r_rows, r_cols, r_vals, names, count = [], [], [], [], 0
    for i, t in chosen.items():
        r, c, v = rows_of(i)
        keep = t[r]
        renum = torch.cumsum(t.long(), 0) - 1
        r_rows.append(renum[r[keep]] + count)
        r_cols.append(c[keep])
        r_vals.append(v[keep])
        count += int(t.sum())
        names.append(factors[i][0].name)
    rows, cols, vals = torch.cat(r_rows), torch.cat(r_cols), torch.cat(r_vals)
    touched = torch.zeros(n, dtype=torch.bool)
    touched[cols] = True
    other = torch.zeros(n, dtype=torch.bool)  # entries touched by rows outside R
    for i, (_f, _, fcols) in enumerate(factors):
        if touched[fcols].any():
            r, c, _ = rows_of(i)
            out_r = ~chosen[i][r] if i in chosen else torch.ones_like(r, dtype=torch.bool)
            other[c[out_r]] = True
    norms = torch.zeros(count, dtype=torch.float64).index_add_(0, rows, vals**2).sqrt()
    vals = vals / norms[rows]
    s_ent = in_s[cols]
    a_s = torch.zeros(count, sl.size, dtype=torch.float64)
    a_s[rows[s_ent], where[cols[s_ent]]] = vals[s_ent]
    out, free = ~s_ent, ~s_ent & ~other[cols]
    # compact column numbering for the Gram matrices
    _, compact = torch.unique(cols, return_inverse=True)
    low_gram = _gram(rows[out], compact[out], vals[out], count)
    up_gram = _gram(rows[free], compact[free], vals[free], count)
    lower, basis = _inside(a_s, low_gram if out.any() else a_s.new_zeros(count, count))
    upper, _ = _inside(a_s, up_gram if free.any() else a_s.new_zeros(count, count))
    shared = int((touched & ~in_s & other).sum())
    return SliceOrbit(lower, max(upper, lower), basis, count, tuple(names), shared)
