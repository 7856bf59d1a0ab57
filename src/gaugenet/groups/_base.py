"""The abstract gauge factor: one named part of a model's gauge group.

A factor acts on a model's state (`dict[str, Tensor]` of parameters and buffers) by a
pure function. Continuous factors have a Lie algebra of dimension `dim` and an
exponential map from algebra coordinates `xi` of shape `(dim,)` to elements; discrete
factors have `dim == 0`.

Convention: `act(act(s, g), h) == act(s, compose(g, h))` (a right action).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._errors import GaugeError

__all__ = ["AbstractFactor", "Breaker", "State"]

State = dict[str, Tensor]


@dataclass(frozen=True)
class Breaker:
    """An operation that breaks a would-be symmetry: where, and why."""

    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


@dataclass(eq=False)
class AbstractFactor(abc.ABC):
    """One factor of a gauge group.

    - `name`: unique within its group, e.g. `"conv1"` or `"layers.0.attn.qk"`.
    - `kind`: `"rescaling"`, `"gl"`, `"affine"`, `"orthogonal"`, `"translation"`,
      `"offset"` (a LayerNorm's `I + c 1ᵀ`), `"free"` (entries no output reads) or
      `"permutation"`.
    - `dim`: dimension of the factor's Lie algebra (0 for discrete factors).
    - `modules`: the names of the modules whose parameters it changes.
    """

    name: str
    modules: tuple[str, ...] = field(default=(), kw_only=True)

    kind: str = field(default="", init=False)

    @property
    @abc.abstractmethod
    def dim(self) -> int: ...

    @property
    def discrete(self) -> bool:
        return False

    @abc.abstractmethod
    def identity(self, dtype: torch.dtype = torch.float64) -> Tensor: ...

    @abc.abstractmethod
    def sample(
        self,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        scale: float = 0.5,
    ) -> Tensor: ...

    @abc.abstractmethod
    def compose(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def inverse(self, a: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def validate(self, a: Tensor) -> None:
        """Raise `GaugeError` naming the factor and the entry if `a` is no element."""

    def apply(self, state: State, a: Tensor) -> State:
        """The action on a state: a new dict; tensors not touched are shared. Each of the
        factor's `terms` updates the dict in turn, given `_term_input(a)`."""
        new = dict(state)
        arg = self._term_input(a)
        for term in getattr(self, "terms", ()):
            term(new, arg)
        return new

    def _term_input(self, a: Tensor) -> Tensor:
        """What the terms receive: the element itself, unless a factor says otherwise."""
        return a

    def exp(self, xi: Tensor) -> Tensor:
        """Algebra coordinates `(dim,)` to a group element."""
        raise GaugeError(f"factor {self.name!r} ({self.kind}) is discrete: it has no exponential")

    def params(self) -> tuple[str, ...]:
        """State entries this factor reads or writes."""
        return ()

    # -- helpers for subclasses -------------------------------------------------
    def _fail(self, what: str) -> GaugeError:
        return GaugeError(f"factor {self.name!r} ({self.kind}): {what}")

    def _check_finite(self, a: Tensor) -> None:
        if not torch.is_floating_point(a):
            raise self._fail(f"element must be a floating tensor, got {a.dtype}")
        bad = ~torch.isfinite(a)
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise self._fail(f"entry {idx} is not finite ({float(a[idx])})")
