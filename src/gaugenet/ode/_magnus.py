"""Magnus integrators at Gauss-Legendre nodes: the exponent `Ω` of one step of a Wilson line.

One Magnus step replaces the time-ordered exponential over `[t, t + h]` by `exp(Ω(h))`, where
`Ω` is built from `w` at Gauss-Legendre nodes and a few commutators. Gauss-Legendre Magnus
methods are time-symmetric, so a step with `h < 0` is exactly the inverse of the step with
`-h`: `W_{t0:t1} = W_{t1:t0}⁻¹` holds to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._errors import GaugeError

__all__ = ["Magnus4", "Magnus6", "MagnusMethod"]


class MagnusMethod:
    """A Magnus integrator: `order`, Gauss-Legendre `nodes` in `[0, 1]`, and `omega`.

    `embedded`, when set, is a lower-order method whose lines, taken beside this method's
    in the same pass, estimate the error (see `wilson_line`)."""

    order: int
    nodes: tuple[float, ...]
    embedded: MagnusMethod | None = None

    def omega(self, A: Tensor, h: Tensor) -> Tensor:
        """The step exponent `Ω` from `A[..., j, :, :] = w(t + nodes[j] h)`, of shape
        `(..., s, d, d)` for `s` nodes; `h` broadcasts against `(..., d, d)` as `(..., 1, 1)`.
        Returns `(..., d, d)`."""
        raise NotImplementedError

    def omega_and_gap(self, A: Tensor, Ae: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """`Ω` (as `omega`) and its gap `Ω - Ω_e` to an embedded exponent of the order of
        `embedded`, from the node values `A` and `Ae` (at `embedded.nodes`). By default
        `Ω_e` is `embedded.omega(Ae, h)`; a method may share its own products with it."""
        if self.embedded is None:
            raise GaugeError("wilson_line: the method has no embedded method to check against")
        omega = self.omega(A, h)
        return omega, omega - self.embedded.omega(Ae, h)


def _result_shape(A: Tensor, h: Tensor) -> tuple[int, ...]:
    """The broadcast of `A.shape` without its node axis with `h.shape` (plain Python:
    `torch.broadcast_shapes` costs more than a small step's arithmetic)."""
    a = tuple(A.shape[:-3]) + tuple(A.shape[-2:])
    b = tuple(h.shape)
    if len(b) > len(a):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            raise GaugeError(f"wilson_line: step shape {tuple(h.shape)} does not fit {a}")
        out.append(y if x == 1 else x)
    return tuple(out)


def _moments(A: Tensor, h: Tensor, M: Sequence[Sequence[float]]) -> tuple[Tensor, ...]:
    """`h Σ_j M[k][j] A[..., j, :, :]` for each row `k` of `M`, flattened to `(N, d, d)`
    batches; `h` broadcasts as `(..., 1, 1)`. Each moment is one new tensor, accumulated in
    place (few whole-batch temporaries)."""
    d = A.shape[-1]
    nodes = A.unbind(-3)
    out = []
    for row in M:
        terms = [(c, a) for c, a in zip(row, nodes) if c != 0.0]
        c0, a0 = terms[0]
        acc = a0 * (c0 * h)
        for c, a in terms[1:]:
            acc.addcmul_(a, h, value=c)
        out.append(acc.reshape(-1, d, d))
    return tuple(out)


class Magnus4(MagnusMethod):
    """Fourth-order Magnus method at the two Gauss-Legendre nodes `1/2 ∓ √3/6`:
    `Ω = h (a₁ + a₂)/2 + (√3/12) h² [a₂, a₁]`."""

    order = 4
    nodes = (0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6)

    def omega(self, A: Tensor, h: Tensor) -> Tensor:
        shape = _result_shape(A, h)
        # The mean and the scaled difference of the two node values.
        r = math.sqrt(3) / 12
        mean, diff = _moments(A, h, ((0.5, 0.5), (-r, r)))
        # (√3/12) h² [a₂, a₁] = [(√3/12) h (a₂ - a₁), h (a₁ + a₂)/2] = [diff, mean].
        out = torch.bmm(diff, mean).baddbmm_(mean, diff, alpha=-1.0).add_(mean)
        return out.reshape(shape)


class Magnus6(MagnusMethod):
    """Sixth-order Magnus method at the three Gauss-Legendre nodes `1/2 - √15/10, 1/2,
    1/2 + √15/10`, with the commutator grouping that needs three commutators per step.

    Its embedded exponent (`omega_and_gap`) is of order 4: the two-node Gauss-Legendre
    integral of `w` (at `Magnus4`'s nodes: two more field values) minus `[α₁, α₂]/12`, the
    commutator this method computes anyway, so the gap costs no product. The gap holds
    Magnus6's fifth-order commutator terms and the difference of the two quadratures, which
    sees the field's variation even where every commutator vanishes.
    """

    order = 6
    embedded = Magnus4()
    nodes = (0.5 - math.sqrt(15) / 10, 0.5, 0.5 + math.sqrt(15) / 10)
    # Legendre moments of w about the step midpoint (before the factor h).
    _MOMENTS = (
        (0.0, 1.0, 0.0),
        (-math.sqrt(15) / 3, 0.0, math.sqrt(15) / 3),
        (10.0 / 3.0, -20.0 / 3.0, 10.0 / 3.0),
    )

    def omega(self, A: Tensor, h: Tensor) -> Tensor:
        return self._omega(A, h, None)[0]

    def omega_and_gap(self, A: Tensor, Ae: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        omega, other = self._omega(A, h, Ae)
        return omega, omega - other

    def _omega(self, A: Tensor, h: Tensor, Ae: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """`Ω` and, with `Ae` (two-node values), the embedded exponent."""
        shape = _result_shape(A, h)
        al1, al2, al3 = _moments(A, h, self._MOMENTS)
        # Fused products accumulate into fresh results in place (baddbmm_ computes
        # beta*x + alpha*a@b without copying x); no backward pass reads what they overwrite.
        c1 = torch.bmm(al1, al2).baddbmm_(al2, al1, alpha=-1.0)  # [al1, al2]
        other = None
        if Ae is not None:
            (mean,) = _moments(Ae, h, ((0.5, 0.5),))
            other = mean.sub_(c1, alpha=1.0 / 12).reshape(shape)
        y = torch.add(c1, al3, alpha=2.0)
        c2 = torch.bmm(al1, y).baddbmm_(y, al1, beta=-1.0 / 60, alpha=1.0 / 60)  # -[al1, y]/60
        u = c1.sub_(al1, alpha=20.0).sub_(al3)  # [al1, al2] - 20 al1 - al3
        v = c2.add_(al2)
        out = torch.bmm(u, v).baddbmm_(v, u, alpha=-1.0)  # [u, v]
        out = out.mul_(1.0 / 240).add_(al1).add_(al3, alpha=1.0 / 12)
        return out.reshape(shape), other
