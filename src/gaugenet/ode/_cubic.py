"""Self-attention as an integrated nonlinear neural ODE (paper Sec. 4.2, eq. 38-42).

`ẋ^i = w^i_j(t) x^j + λ^i_{jkl}(t) x^j x^k x^l` (eq. 38). To first order in `λ` the flow is
`x(t) = W_{t:0} x(0) + Λ(t)[x(0), x(0), x(0)]` with the kernel `Λ` given before eq. (39). An
instantaneous nonlinearity `λ(t) = δ(t − t₀) λ ⊗ λ̃` (eq. 40) and a trivial holonomy
`W_{T:0} = 1` turn `x(T)` into `x(0)` plus one attention layer with identity activation
(eq. 41); with the token structure of eq. (42) the same holds for `n` tokens. The delta is
smoothed by a normalized Gaussian of width `σ`, truncated at `±8σ`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ._wilson import wilson_line

__all__ = ["CubicNODE", "first_order_kernel", "gaussian_bump", "token_cubic"]

Field = Callable[[Tensor], Tensor]
_CHUNK = 256
_CUT = 8.0  # bump truncated at ±_CUT σ (the Gaussian tail there is e^{-32})
_GL_X, _GL_W = (torch.tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(8))


def gaussian_bump(t: Tensor, t0: float, sigma: float) -> Tensor:
    """`exp(−(t − t₀)²/2σ²)/(σ√(2π))` on `|t − t₀| ≤ 8σ`, zero outside."""
    z = (t - t0) / sigma
    return torch.where(
        z.abs() <= _CUT,
        torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi)),
        torch.zeros_like(t),
    )


class CubicNODE(nn.Module):
    """The neural ODE of eq. (38) on `[0, T]`.

    **Arguments:**

    - `w`: callable, times `(m,)` → `(m, d, d)`.
    - `lam`: callable, times `(m,)` → `(m, d, d, d, d)` (`λ^i_{jkl}`).
    - `T`: final time.
    - `breaks`: times inside `(0, T)` where `λ` changes fast (the integrators put segment
      boundaries there); `CubicNODE.instantaneous` sets them around the bump.
    - `steps`: RK4 steps per segment for `forward`.
    """

    def __init__(
        self, w: Field, lam: Field, T: float, *, breaks: tuple[float, ...] = (), steps: int = 200
    ) -> None:
        super().__init__()
        if not T > 0:
            raise GaugeError(f"CubicNODE: the final time T must be positive, got {T}")
        if any(not 0 < b < T for b in breaks):
            raise GaugeError(f"CubicNODE: breaks {breaks} must lie inside (0, {T})")
        self.w, self.lam, self.T, self.steps = w, lam, float(T), steps
        self.edges = (0.0, *sorted(breaks), float(T))
        #: for λ(t) = profile(t) · core: evaluated without building (m, d, d, d, d) tensors
        self._profile: Field | None = None
        self._core: Tensor | None = None

    @classmethod
    def instantaneous(
        cls,
        w: Field,
        lam_vec: Tensor,
        lam_tilde: Tensor,
        t0: float,
        T: float,
        sigma: float,
        *,
        steps: int = 200,
    ) -> CubicNODE:
        """`λ^i_{jkl}(t) = δ_σ(t − t₀) λ^i_j λ̃_{kl}` (eq. 40), `δ_σ` the Gaussian bump."""
        d = lam_vec.shape[-1]
        if lam_vec.shape != (d, d) or lam_tilde.shape != (d, d):
            raise GaugeError(
                f"instantaneous: λ and λ̃ must be (d, d), got {tuple(lam_vec.shape)} "
                f"and {tuple(lam_tilde.shape)}"
            )
        return cls._bumped(w, torch.einsum("ij,kl->ijkl", lam_vec, lam_tilde), t0, T, sigma, steps)

    @classmethod
    def _bumped(
        cls, w: Field, core: Tensor, t0: float, T: float, sigma: float, steps: int
    ) -> CubicNODE:
        if not (sigma > 0 and t0 - _CUT * sigma > 0 and t0 + _CUT * sigma < T):
            raise GaugeError(f"the bump t0 ± 8σ = {t0} ± {_CUT * sigma} must lie inside (0, {T})")

        def profile(t: Tensor) -> Tensor:
            return gaussian_bump(t, t0, sigma)

        node = cls(
            w,
            lambda t: profile(t)[:, None, None, None, None] * core,
            T,
            breaks=(t0 - _CUT * sigma, t0 + _CUT * sigma),
            steps=steps,
        )
        node._profile, node._core, node.t0, node.sigma = profile, core, t0, sigma
        return node

    def _cubic(self, lam: Tensor, x: Tensor) -> Tensor:
        return torch.einsum("ijkl,...j,...k,...l->...i", lam, x, x, x)

    def vector_field(self, t: Tensor, x: Tensor) -> Tensor:
        """`w(t) x + λ(t)[x, x, x]` at a scalar time `t`; `x`: `(..., d)`."""
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(1)
        return x @ self.w(tt)[0].transpose(-1, -2) + self._cubic(self.lam(tt)[0], x)

    def forward(self, x0: Tensor, scale: Tensor | float = 1.0) -> Tensor:
        """`x(T)` by classical RK4, `steps` per segment. `x0`: `(..., d)`; `scale`
        (broadcastable to `x0.shape[:-1]`) multiplies `λ`, so several strengths are solved
        in one batch. `w` and `λ` are evaluated at all stage times of a segment at once."""
        x = x0
        sc = torch.as_tensor(scale, dtype=x0.dtype)[..., None]
        for a, b in zip(self.edges[:-1], self.edges[1:]):
            h = (b - a) / self.steps
            times = a + torch.arange(2 * self.steps + 1, dtype=x0.dtype) * (h / 2)
            wt = self.w(times).transpose(-1, -2)
            # λ(t) = p(t) · core: keep only the profile (an n-token core has (n d)^4 entries)
            if self._profile is not None:
                p_t, lam_t = self._profile(times), self._core
            else:
                p_t, lam_t = torch.ones_like(times), self.lam(times)
            for n in range(self.steps):
                i, j, k = 2 * n, 2 * n + 1, 2 * n + 2
                k1 = self._rhs(wt[i], p_t[i], lam_t, i, sc, x)
                k2 = self._rhs(wt[j], p_t[j], lam_t, j, sc, x + h / 2 * k1)
                k3 = self._rhs(wt[j], p_t[j], lam_t, j, sc, x + h / 2 * k2)
                k4 = self._rhs(wt[k], p_t[k], lam_t, k, sc, x + h * k3)
                x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    def _rhs(self, w_t: Tensor, p: Tensor, lam: Tensor, k: int, sc: Tensor, y: Tensor) -> Tensor:
        lam_k = lam if self._profile is not None else lam[k]
        return y @ w_t + (sc * p) * self._cubic(lam_k, y)


def first_order_kernel(node: CubicNODE, t: float, *, panels: int = 8) -> Tensor:
    """`Λ^i_{jkl}(t)` (given before eq. 39), the first-order term of the flow in `λ`.

    The time integral uses composite 8-point Gauss-Legendre quadrature (`panels` per segment
    of the node), with all Wilson lines `W_{t':0}`, `W_{0:t'}` from `wilson_line` in one batch.

    **Returns:** `(d, d, d, d)`.
    """
    if not 0 <= t <= node.T:
        raise GaugeError(f"first_order_kernel: t={t} outside [0, {node.T}]")
    edges = [e for e in node.edges if e < t] + [t]
    nodes, weights = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        cuts = torch.linspace(a, b, panels + 1, dtype=torch.float64)
        mid, half = (cuts[1:] + cuts[:-1]) / 2, (cuts[1:] - cuts[:-1]) / 2
        nodes.append((mid[:, None] + half[:, None] * _GL_X).reshape(-1))
        weights.append((half[:, None] * _GL_W).reshape(-1))
    if not nodes:
        lam0 = node.lam(torch.zeros(1, dtype=torch.float64))[0]
        return torch.zeros_like(lam0)
    s, wq = torch.cat(nodes), torch.cat(weights)
    fwd = wilson_line(node.w, s, 0.0)  # W_{t':0}, (m, d, d)
    back = torch.linalg.inv(fwd)  # W_{0:t'}
    inner = 0
    for c in range(0, len(s), _CHUNK):  # chunks bound the (m, d, d, d, d) intermediates
        sl = slice(c, c + _CHUNK)
        if node._profile is not None:
            lam = (wq[sl] * node._profile(s[sl]))[:, None, None, None, None] * node._core
        else:
            lam = wq[sl][:, None, None, None, None] * node.lam(s[sl])
        y = torch.einsum("mab,mbcde->macde", back[sl], lam)
        y = torch.einsum("macde,mcj->majde", y, fwd[sl])
        y = torch.einsum("majde,mdk->majke", y, fwd[sl])
        inner = inner + torch.einsum("majke,mel->ajkl", y, fwd[sl])
    return torch.einsum("ia,ajkl->ijkl", wilson_line(node.w, t, 0.0), inner)


def token_cubic(
    w: Field,
    lam_vec: Tensor,
    lam_tilde: Tensor,
    n: int,
    t0: float,
    T: float,
    sigma: float,
    *,
    steps: int = 200,
) -> CubicNODE:
    """The `n`-token neural ODE of eq. (42): state `X (n, d)` flattened token-major to `n d`,
    `w ⊗ 1` on every token and `λ^{iI}_{jJkKlL} = δ_σ(t − t₀) λ^i_j λ̃_{kl} δ^I_K δ_{JL}`, i.e.
    `Ẋ_I = w X_I + δ_σ Σ_J (X_Iᵀ λ̃ X_J) λ X_J` (query from token `I`, key and value from `J`).
    """
    d = lam_vec.shape[-1]
    eye = torch.eye(n, dtype=lam_vec.dtype)
    # index order (I i), (J j), (K k), (L l)
    core = torch.einsum("ij,kl,IK,JL->IiJjKkLl", lam_vec, lam_tilde, eye, eye)
    core = core.reshape(n * d, n * d, n * d, n * d)

    def w_big(t: Tensor) -> Tensor:
        return torch.einsum("IJ,mij->mIiJj", eye, w(t)).reshape(-1, n * d, n * d)

    return CubicNODE._bumped(w_big, core, t0, T, sigma, steps)
