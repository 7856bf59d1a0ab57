"""Spacetime diffeomorphisms as gauge transformations of neural ODEs (Theorem 2.1).

Project convention (EQUATIONS.md, Sec. 1): old state `= φ_t`(new state). A spatial
diffeomorphism pulls the field back as
`F'(t, x') = Dφ_t(x')⁻¹ [F(t, φ_t(x')) − ∂_t φ_t(x')]`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ._diffeo_tools import fix_ends, rk4_flow, spacetime_jacobian
from ._neural_ode import Field, as_field_module

__all__ = ["AbstractDiffeo", "SpatialDiffeo"]

RowMap = Callable[[Tensor, Tensor], Tensor]


class _PulledBackField(nn.Module):
    """The field `diffeo^* F`; an `nn.Module` holding both, so gradients reach either."""

    def __init__(self, field: Field, diffeo: AbstractDiffeo) -> None:
        super().__init__()
        self.field = as_field_module(field)
        self.diffeo = diffeo

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.diffeo.check_boundary(x)
        return self.diffeo._pull(self.field, t, x)


class AbstractDiffeo(nn.Module):
    """A diffeomorphism of the spacetime `[0, T] × R^d`, acting on neural ODEs.

    `spacetime(t, x)` maps new spacetime points to old ones; `pullback_field(F)` is the
    field of the transformed neural ODE. Boundary-fixing diffeomorphisms keep the
    input-output map (Theorem 2.1).
    """

    T: float

    def pullback_field(self, field: Field) -> nn.Module:
        """The new vector field `F'` whose solutions are the old ones in new coordinates."""
        return _PulledBackField(field, self)

    def check_boundary(self, x: Tensor) -> None:
        """Raise `GaugeError` if the map is not the identity at `t = 0` and `t = T`, checked
        once per state dimension and dtype at the points `x` `(batch, d)` and at random
        points. Time reparametrizations check their ends when built: nothing to do here."""

    @abc.abstractmethod
    def _pull(self, field: Field, t: Tensor, x: Tensor) -> Tensor:
        """`F'(t, x)` for `t` a scalar tensor and `x` of shape `(batch, d)`."""

    @abc.abstractmethod
    def spacetime(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Old `(time, state)` of the new point `(t, x)`; time `()` or `(batch,)`."""

    @abc.abstractmethod
    def spacetime_inverse(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """New `(time, state)` of the old point `(t, x)`; time `()` or `(batch,)`."""


class SpatialDiffeo(AbstractDiffeo):
    """A family `φ_t` of diffeomorphisms of R^d, `t ∈ [0, T]`, with its inverse.

    **Arguments:**

    - `phi`: `phi(t, x)` the old state of the new state `x` at time `t`; `t` a scalar
        tensor, `x` of shape `(batch, d)`, acting on each row separately. It must be
        differentiable by `torch.func` (no data-dependent branching).
    - `phi_inverse`: its inverse at each `t`.
    - `T`: the final time.

    - `d`: the state dimension, if known: then the boundary condition is checked at once.
    - `check_boundary`: check Theorem 2.1's boundary condition `φ_0 = φ_T = id`, at
        spread-out points and at the states the pulled-back field first sees (relative tolerance
        `1000 ε` of the dtype); `False` applies a map that breaks it as given (the
        input-output map then changes, as the necessity half of the theorem says).

    Without `d` the check runs when the pulled-back field is first evaluated (the first
    states are the inputs `x(0)`). The constructors `from_generator` and `linear` build
    boundary-fixing families. `phi(t, x)` and `phi.inverse(t, x)` evaluate the map and its
    inverse; `boundary_error(x)` measures the boundary condition at given points.

    **Raises:** `GaugeError` saying which end, by how much and at which point, when the
    boundary condition fails.
    """

    def __init__(
        self,
        phi: RowMap,
        phi_inverse: RowMap,
        T: float = 1.0,
        *,
        d: int | None = None,
        check_boundary: bool = True,
    ) -> None:
        super().__init__()
        if not T > 0:
            raise GaugeError(f"SpatialDiffeo: T must be positive, got {T}")
        self.phi = phi
        self.phi_inverse = phi_inverse
        self.T = float(T)
        self._check_ends = check_boundary
        self._checked: set[tuple[int, torch.dtype]] = set()
        if d is not None:
            self.check_boundary(torch.zeros(4, d, dtype=torch.float64))

    def check_boundary(self, x: Tensor) -> None:
        if not self._check_ends or (x.shape[-1], x.dtype) in self._checked:
            return
        d, dtype = x.shape[-1], x.dtype
        x = x.reshape(-1, d)
        # the states themselves and random points of the same shape (maps may act row-wise,
        # one map per row), at several scales; inside a torch.func transform (a field pulled
        # back by a time shift is evaluated row by row under vmap) the states are symbolic and
        # only the random points are used
        n = max(x.shape[0], 1)
        sets = [x.detach()] if x.shape[0] and not _transformed(x) else []
        sets += [s * _spread(n, d, dtype).to(x.device) for s in (1.0, 3.0)]
        tol = 1e3 * torch.finfo(dtype).eps
        with torch.no_grad():
            for name, end in (("t = 0", 0.0), (f"t = T = {self.T:g}", self.T)):
                t = torch.tensor(end, dtype=dtype, device=x.device)
                for points in sets:
                    moved = (self(t, points) - points).abs().amax(-1)
                    scale = 1 + points.abs().amax(-1)
                    k = int((moved / scale).argmax())
                    if not bool(moved[k] <= tol * scale[k]):
                        raise GaugeError(
                            f"SpatialDiffeo: φ must be the identity at {name} (Theorem 2.1's "
                            f"boundary condition); it moves x = {points[k].tolist()} by "
                            f"{float(moved[k]):.3e} (tolerance {tol:.1e} (1 + |x|)). "
                            "check_boundary=False applies it anyway, changing the "
                            "input-output map"
                        )
        self._checked.add((d, dtype))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.phi(t, x)

    def inverse(self, t: Tensor, x: Tensor) -> Tensor:
        """`φ_t⁻¹(x)`, shape `(batch, d)`."""
        return self.phi_inverse(t, x)

    def _pull(self, field: Field, t: Tensor, x: Tensor) -> Tensor:
        y, dy_dt, jac = spacetime_jacobian(self.forward, t, x)
        return torch.linalg.solve(jac, (field(t, y) - dy_dt)[..., None])[..., 0]

    def spacetime(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return t, self(t, x)

    def spacetime_inverse(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return t, self.inverse(t, x)

    def boundary_error(self, x: Tensor) -> tuple[float, float]:
        """`max |φ_0(x) − x|` and `max |φ_T(x) − x|` over the points `x` `(batch, d)`."""
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        with torch.no_grad():
            e0 = (self(zero, x) - x).abs().max().item()
            eT = (self(zero + self.T, x) - x).abs().max().item()
        return e0, eT

    @classmethod
    def from_generator(
        cls,
        eps: RowMap,
        T: float = 1.0,
        *,
        n_steps: int = 16,
        fix_boundary: bool = True,
        newton_steps: int = 2,
    ) -> SpatialDiffeo:
        r"""`φ_t` = time-1 flow of the generator field `x ↦ ε(t, x)` at frozen `t`.

        The generator is forced to vanish at both ends: it is multiplied by the window
        `4 (t/T)(1 − t/T)`, so `φ_0 = φ_T = id` exactly (the generator actually used,
        `phi.generator`, is the one to pass to `lie_derivative`). To first order
        `φ_t = id + phi.generator` (eq. 13).

        **Arguments:**

        - `eps`: generator `ε(t, x)`, `x` `(batch, d)` to `(batch, d)`, row-wise.
        - `T`: the final time.
        - `n_steps`: Runge-Kutta steps of the flow. For any value the result is an exact
            smooth map whose derivatives are exact; more steps only bring it closer to
            the true flow.
        - `fix_boundary`: `False` keeps `ε` as given, which breaks Theorem 2.1's
            boundary condition (used to show that the condition is needed).
        - `newton_steps`: Newton refinements of the inverse (the flow of `−ε`).
        """
        return _GeneratorDiffeo(eps, T, n_steps, fix_boundary, newton_steps)

    @classmethod
    def linear(
        cls,
        G: Callable[[Tensor], Tensor],
        c: Callable[[Tensor], Tensor],
        T: float = 1.0,
        *,
        G_dot: Callable[[Tensor], Tensor] | None = None,
        c_dot: Callable[[Tensor], Tensor] | None = None,
        atol: float | None = None,
        n_check: int = 513,
    ) -> SpatialDiffeo:
        """The affine family `φ_t(x) = G(t) x + c(t)` (the gauge group of eq. 24-25).

        **Arguments:**

        - `G`: `G(t)` of a scalar tensor `t`, shape `(d, d)` (or `(batch, d, d)`: one map
            per row of the states it acts on).
        - `c`: `c(t)`, shape `(d,)` (or `(batch, d)`).
        - `T`: the final time.
        - `G_dot`, `c_dot`: the time derivatives, if known; else by `torch.func.jacfwd`.
        - `atol`: tolerance of the boundary checks `G(0) = G(T) = 1`, `c(0) = c(T) = 0`
            (`1e-12` in float64, `1e-5` in float32).
        - `n_check`: number of sampled times in `[0, T]` where `det G(t) > 0` is checked; every
            dip of `σ_min/σ_max` between them is refined by golden section.

        **Raises:** `GaugeError` if a boundary condition fails (saying which end and by
        how much) or if `G(t)` is singular, ill-conditioned (`σ_min/σ_max < √ε`) or has
        `det ≤ 0` somewhere, saying at which time.
        """
        from ._diffeo_linear import LinearDiffeo

        return LinearDiffeo(G, c, T, G_dot=G_dot, c_dot=c_dot, atol=atol, n_check=n_check)


def _spread(n: int, d: int, dtype: torch.dtype) -> Tensor:
    """`n` fixed pseudo-random points in `[-1, 1]^d`, built without a random generator (random
    operations are refused inside `vmap`)."""
    i = torch.arange(1, n + 1, dtype=dtype)[:, None]
    j = torch.arange(1, d + 1, dtype=dtype)[None, :]
    return torch.sin(12.9898 * i * j + 78.233 * j + 0.5 * i)


def _transformed(x: Tensor) -> bool:
    """Whether `x` is a tensor wrapped by a `torch.func` transform (vmap, grad, jvp)."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(wrapped(x)) if wrapped is not None else False


class _GeneratorDiffeo(SpatialDiffeo):
    """`φ_t = exp(ε(t, ·))`, the flow of a generator; built by `SpatialDiffeo.from_generator`."""

    def __init__(
        self, eps: RowMap, T: float, n_steps: int, fix_boundary: bool, newton_steps: int
    ) -> None:
        super().__init__(self._flow, self._flow_inverse, T, check_boundary=fix_boundary)
        if n_steps < 1:
            raise GaugeError(f"from_generator: n_steps must be at least 1, got {n_steps}")
        self.raw_generator = as_field_module(eps)
        self.generator = fix_ends(self.raw_generator, self.T) if fix_boundary else eps
        self.n_steps = n_steps
        self.newton_steps = newton_steps

    def _flow_of(self, sign: float, t: Tensor, x: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return rk4_flow(lambda _, y: sign * self.generator(t, y), x, zero, zero + 1, self.n_steps)

    def _flow(self, t: Tensor, x: Tensor) -> Tensor:
        return self._flow_of(1.0, t, x)

    def _flow_inverse(self, t: Tensor, x: Tensor) -> Tensor:
        # The flow of −ε inverts the exact flow only up to the Runge-Kutta error;
        # Newton's method on φ_t(y) = x makes it the inverse of the map actually used.
        y = self._flow_of(-1.0, t, x)
        for _ in range(self.newton_steps):
            value, _, jac = spacetime_jacobian(self._flow, t, y)
            y = y - torch.linalg.solve(jac, (value - x)[..., None])[..., 0]
        return y
