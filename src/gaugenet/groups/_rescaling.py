"""Positive rescalings of channels: the symmetry of positively homogeneous networks (eq. 29, 52)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._base import AbstractFactor, State

__all__ = ["BatchNormShift", "RescalingFactor", "Scale"]


@dataclass(frozen=True)
class Scale:
    """`state[param] *= alpha_ext[index] ** power`.

    `index` is an integer tensor broadcastable to the parameter's shape, with values in
    `[0, n]`; the value `n` means "not scaled by this factor" (`alpha_ext[n] = 1`).
    """

    param: str
    index: Tensor
    power: int

    def __call__(self, new: State, alpha_ext: Tensor) -> None:
        new[self.param] = new[self.param] * alpha_ext[self.index] ** self.power

    def value(self, p: Tensor) -> Tensor:
        """The entries the scales multiply, from the parameter's value `p`: `p` itself
        (`OffsetScale`: `p + offset`)."""
        return p


@dataclass(frozen=True)
class BatchNormShift:
    """Eval-mode BatchNorm absorbing a scale of its input.

    `BN(x) = γ (x − μ)/s + β` with `s = sqrt(var + eps)`; for input `α x` the same output
    needs `γ ↦ γ/α` and `β ↦ β + (γ μ / s)(1/α − 1)`. The running statistics stay fixed,
    so this is a symmetry of the parameters alone. `index`: `(C,)` values in `[0, n]`.
    """

    weight: str
    bias: str
    mean: str
    var: str
    eps: float
    index: Tensor

    def __call__(self, new: State, alpha_ext: Tensor) -> None:
        a = alpha_ext[self.index]
        gamma = new[self.weight]
        s = torch.sqrt(new[self.var].to(gamma.dtype) + self.eps)
        new[self.bias] = new[self.bias] + gamma * new[self.mean].to(gamma.dtype) / s * (1 / a - 1)
        new[self.weight] = gamma / a


@dataclass(eq=False)
class RescalingFactor(AbstractFactor):
    """`n` positive scales `α` acting by the listed terms. Element: `(n,)`, all `> 0`."""

    n: int = 0
    terms: tuple = field(default=(), kw_only=True)
    #: channel labels (e.g. "conv1[3]") for messages; optional
    labels: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        self.kind = "rescaling"

    @property
    def dim(self) -> int:
        return self.n

    def identity(self, dtype=torch.float64) -> Tensor:
        return torch.ones(self.n, dtype=dtype)

    def sample(self, generator=None, dtype=torch.float64, scale=0.5) -> Tensor:
        return torch.exp(scale * torch.randn(self.n, generator=generator, dtype=torch.float64)).to(
            dtype
        )

    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b

    def inverse(self, a: Tensor) -> Tensor:
        self.validate(a)
        return 1 / a

    def exp(self, xi: Tensor) -> Tensor:
        return torch.exp(xi)

    def validate(self, a: Tensor) -> None:
        if a.shape != (self.n,):
            raise self._fail(f"expected scales of shape ({self.n},), got {tuple(a.shape)}")
        self._check_finite(a)
        bad = (a <= 0).nonzero()
        if len(bad):
            i = int(bad[0])
            where = self.labels[i] if self.labels else f"index {i}"
            raise self._fail(f"scale at {where} is {float(a[i]):.6g}; scales must be positive")

    def _term_input(self, a: Tensor) -> Tensor:
        # the terms index with `n` for "unscaled": append a scale of one
        return torch.cat([a, torch.ones(1, dtype=a.dtype, device=a.device)])

    def params(self) -> tuple[str, ...]:
        out: list[str] = []
        for t in self.terms:
            out += [t.param] if isinstance(t, Scale) else [t.weight, t.bias]
        return tuple(dict.fromkeys(out))
