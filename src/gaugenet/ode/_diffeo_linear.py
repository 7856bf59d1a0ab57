"""Affine gauge transformations `φ_t(x) = G(t) x + c(t)` of neural ODEs (eq. 24-25)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jacfwd, vmap

from .._errors import GaugeError
from ._diffeo import SpatialDiffeo
from ._gl_plus import gl_plus_violation
from ._neural_ode import Field

__all__ = ["LinearDiffeo"]

MatrixPath = Callable[[Tensor], Tensor]


def _apply(G: Tensor, x: Tensor) -> Tensor:
    # G is (d, d) or (batch, d, d); x is (batch, d).
    return (G @ x[..., None])[..., 0]


class LinearDiffeo(SpatialDiffeo):
    """`φ_t(x) = G(t) x + c(t)` with `G(0) = G(T) = 1`, `c(0) = c(T) = 0`.

    Built by `SpatialDiffeo.linear`, which documents the arguments. The pulled-back
    field is computed in closed form,
    `F'(t, x) = G⁻¹ [F(t, G x + c) − Ġ x − ċ]`; for a linear field `w x + b` this is
    `w' = G⁻¹ w G − G⁻¹ Ġ`, `b' = G⁻¹ (b + w c − ċ)` (eq. 25).
    """

    def __init__(
        self,
        G: MatrixPath,
        c: MatrixPath,
        T: float,
        *,
        G_dot: MatrixPath | None = None,
        c_dot: MatrixPath | None = None,
        atol: float | None = None,
        n_check: int = 513,
    ) -> None:
        # G and c are checked at both ends exactly, below, instead of at sample points
        super().__init__(self._map, self._map_inverse, T, check_boundary=False)
        self.G = G
        self.c = c
        self.G_dot = G_dot if G_dot is not None else jacfwd(G)
        self.c_dot = c_dot if c_dot is not None else jacfwd(c)
        self._check(atol, n_check)

    def _check(self, atol: float | None, n_check: int) -> None:
        with torch.no_grad():
            probe = self.G(torch.zeros((), dtype=torch.float64))
            dtype, device = probe.dtype, probe.device
            if atol is None:
                atol = 1e-12 if dtype == torch.float64 else 1e-5
            d = probe.shape[-1]
            if probe.shape[-2:] != (d, d):
                raise GaugeError(f"linear: G(t) must be (d, d), got {tuple(probe.shape)}")
            eye = torch.eye(d, dtype=dtype, device=device)
            for name, t in (("t = 0", 0.0), (f"t = T = {self.T:g}", self.T)):
                tt = torch.tensor(t, dtype=dtype, device=device)
                g_err = (self.G(tt) - eye).abs().max().item()
                c_val = self.c(tt)
                if c_val.shape[-1] != d:
                    raise GaugeError(f"linear: c(t) must be ({d},), got {tuple(c_val.shape)}")
                c_err = c_val.abs().max().item()
                if not g_err <= atol:
                    raise GaugeError(
                        f"linear: G must be the identity at {name}; it differs by {g_err:.3e} "
                        f"(max entry, tolerance {atol:.0e})"
                    )
                if not c_err <= atol:
                    raise GaugeError(
                        f"linear: c must vanish at {name}; |c| = {c_err:.3e} "
                        f"(max entry, tolerance {atol:.0e})"
                    )
            found = gl_plus_violation(self._G_at, self.T, dtype, n_grid=n_check)
            if found is not None:
                raise GaugeError(
                    "linear: G(t) is not invertible (or det G ≤ 0, which a continuous path "
                    f"from G(0) = 1 reaches only through a singular matrix): {found.describe()}"
                )

    def _G_at(self, ts: Tensor) -> Tensor:
        """`G` at a 1-D tensor of times, `(m, ..., d, d)`."""
        try:
            return vmap(self.G)(ts)
        except Exception:  # a G that vmap cannot batch (data-dependent code): one call per time
            return torch.stack([self.G(t) for t in ts])

    def _map(self, t: Tensor, x: Tensor) -> Tensor:
        return _apply(self.G(t), x) + self.c(t)

    def _map_inverse(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.linalg.solve(self.G(t), (x - self.c(t))[..., None])[..., 0]

    def _pull(self, field: Field, t: Tensor, x: Tensor) -> Tensor:
        G = self.G(t)
        rhs = field(t, _apply(G, x) + self.c(t)) - _apply(self.G_dot(t), x) - self.c_dot(t)
        return torch.linalg.solve(G, rhs[..., None])[..., 0]
