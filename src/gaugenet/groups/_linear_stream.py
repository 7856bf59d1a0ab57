"""`GL(c)` of a linear residual stream: channels written only by affine layers and read only by
linear maps (MobileNetV2's linear bottlenecks).

A stream `h` of `c` channels (one tensor, or several joined by residual sums) whose writers
are convolutions followed by eval-mode BatchNorm (`h += D W x + b`, `D = diag(γ / σ)`,
`b = β − D μ`, `σ = sqrt(running_var + eps)`) or convolutions with a bias (`h += W x + b`),
and whose readers are convolutions (`y = V h`, any kernel: the channel mixing commutes with
the spatial one, and zero padding stays zero), keeps its function under `h ↦ G⁻¹ h`:

- a BatchNorm writer: `W ↦ D⁻¹ G⁻¹ D W`, `β ↦ G⁻¹ b + D μ` (`γ` and the statistics kept,
  so `D` is read from the state when acting): `ConjugatedRows`;
- a writer with a bias: `W ↦ G⁻¹ W`, `b ↦ G⁻¹ b` (`MatTerm`, mode `"inv"`, axis 0);
- a reader: `V ↦ V G` (`MatTerm`, mode `"T"`, axis 1).

Element: `(1, c, c)`, composed by matrix product (a right action, as `GLFactor`). Its own class
(not a `GLFactor`): the BatchNorm writers' terms are not `MatTerm`s, which code reading a
`GLFactor`'s terms (Noether charges, equalization) assumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._base import State
from ._matrix import BlockGL, MatTerm

__all__ = ["ConjugatedRows", "LinearStreamFactor"]


@dataclass(frozen=True)
class ConjugatedRows:
    """A convolution `weight` (no bias) followed by the eval-mode BatchNorm `bn`: its output
    `D W x + b` becomes `G⁻¹ (D W x + b)` with `γ` and the statistics kept."""

    weight: str
    bn: str
    eps: float

    def __call__(self, new: State, g: Tensor) -> None:
        gamma, beta = new[f"{self.bn}.weight"], new[f"{self.bn}.bias"]
        dt = gamma.dtype
        sigma = torch.sqrt(new[f"{self.bn}.running_var"].to(dt) + self.eps)
        d = gamma / sigma
        mu_d = d * new[f"{self.bn}.running_mean"].to(dt)
        ginv = torch.linalg.inv(g[0].to(dt))
        m = ginv * d[None, :] / d[:, None]  # D⁻¹ G⁻¹ D
        w = new[self.weight]
        new[self.weight] = (m @ w.reshape(w.shape[0], -1)).reshape(w.shape)
        new[f"{self.bn}.bias"] = ginv @ (beta - mu_d) + mu_d

    def params(self) -> tuple[str, ...]:
        b = self.bn
        return (self.weight, f"{b}.bias", f"{b}.weight", f"{b}.running_var", f"{b}.running_mean")


@dataclass(eq=False)
class LinearStreamFactor(BlockGL):
    """`GL(c)` of a linear residual stream (see the module docstring). Element: `(1, c, c)`
    (`b` stays 1)."""

    terms: tuple[ConjugatedRows | MatTerm, ...] = field(default=(), kw_only=True)
    log_cond: float = field(default=2.0, kw_only=True)

    def params(self) -> tuple[str, ...]:
        out: list[str] = []
        for t in self.terms:
            out += list(t.params()) if isinstance(t, ConjugatedRows) else [t.param]
        return tuple(dict.fromkeys(out))
