"""Multi-head self-attention in the paper's form (eq. 35), with its gauge group built in."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._errors import GaugeError

__all__ = ["SelfAttention"]

_BUILTIN: dict[str, tuple[Callable[[Tensor], Tensor] | None, bool]] = {
    # name: (elementwise function, or None for softmax over keys; positively homogeneous?)
    "softmax": (None, False),
    "relu": (torch.relu, True),
    "identity": (lambda s: s, True),
}


class SelfAttention(nn.Module):
    """`h_I = Σ_J φ((x_I W_q + b_q)(x_J W_k + b_k)ᵀ / √d_head) (x_J W_v + b_v)` per head,
    heads concatenated and projected by `W_o` (+ `b_o`). Tokens are rows.

    **Arguments:**

    - `d`: token dimension.
    - `heads`: number of heads; `head_dim` defaults to `d // heads` (used for queries,
      keys and values).
    - `activation`: `"softmax"` (over keys), `"relu"`, `"identity"`, or a callable applied
      elementwise to the scores.
    - `homogeneous`: for a callable activation, the caller's declaration that it is
      positively homogeneous of degree one (`φ(α s) = α φ(s)`, `α > 0`); this adds the `α`
      rescaling of eq. 37 to the gauge group. Ignored for the named activations.
    - `bias`: whether the four projections carry biases.
    - `dtype`: parameter dtype.
    - `generator`: seeds the Gaussian initialization (`N(0, 1/fan_in)`).

    Parameters (paper orientation, `x W`): `w_q, w_k, w_v` `(d, heads·head_dim)`,
    `w_o` `(heads·head_dim, d)`, biases `b_q, b_k, b_v` `(heads·head_dim,)`, `b_o` `(d,)`.
    """

    def __init__(
        self,
        d: int,
        heads: int,
        head_dim: int | None = None,
        *,
        activation: str | Callable[[Tensor], Tensor],
        homogeneous: bool = False,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if heads < 1 or d < 1:
            raise GaugeError(
                f"SelfAttention: d and heads must be positive, got d={d}, heads={heads}"
            )
        if head_dim is None:
            if d % heads:
                raise GaugeError(
                    f"SelfAttention: d={d} is not divisible by heads={heads}; pass head_dim"
                )
            head_dim = d // heads
        if isinstance(activation, str):
            if activation not in _BUILTIN:
                raise GaugeError(
                    f"SelfAttention: unknown activation {activation!r}; use one of "
                    f"{sorted(_BUILTIN)} or a callable"
                )
            self._phi, self.homogeneous = _BUILTIN[activation]
            self.activation_name = activation
        elif callable(activation):
            self._phi, self.homogeneous = activation, bool(homogeneous)
            self.activation_name = getattr(activation, "__name__", type(activation).__name__)
        else:
            raise GaugeError(
                f"SelfAttention: activation must be a string or a callable, got "
                f"{type(activation).__name__}"
            )
        self.d, self.heads, self.head_dim = d, heads, head_dim
        e = heads * head_dim

        def init(*shape: int, fan_in: int) -> nn.Parameter:
            w = torch.randn(*shape, generator=generator, dtype=torch.float64) / math.sqrt(fan_in)
            return nn.Parameter(w.to(dtype))

        self.w_q, self.w_k, self.w_v = (
            init(d, e, fan_in=d),
            init(d, e, fan_in=d),
            init(d, e, fan_in=d),
        )
        self.w_o = init(e, d, fan_in=e)
        if bias:
            self.b_q, self.b_k, self.b_v = (init(e, fan_in=d) for _ in range(3))
            self.b_o = init(d, fan_in=e)
        else:
            self.b_q = self.b_k = self.b_v = self.b_o = None

    @property
    def softmax(self) -> bool:
        return self._phi is None

    def forward(self, x: Tensor) -> Tensor:
        """`x`: `(..., n, d)` tokens. **Returns:** `(..., n, d)`."""
        if x.shape[-1] != self.d:
            raise GaugeError(
                f"SelfAttention: expected tokens of size {self.d}, got {tuple(x.shape)}"
            )

        def heads(w: Tensor, b: Tensor | None) -> Tensor:
            y = x @ w + (b if b is not None else 0)
            return y.unflatten(-1, (self.heads, self.head_dim)).transpose(-2, -3)

        q, k, v = heads(self.w_q, self.b_q), heads(self.w_k, self.b_k), heads(self.w_v, self.b_v)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (..., heads, n, n)
        a = torch.softmax(s, -1) if self._phi is None else self._phi(s)
        h = (a @ v).transpose(-2, -3).flatten(-2)
        return h @ self.w_o + (self.b_o if self.b_o is not None else 0)

    def gauge_factors(self, prefix: str) -> tuple[list, list]:
        """The per-head `qk`, `vo`, `alpha` (homogeneous), `key_shift` (softmax) and head
        permutation factors; see `gaugenet.attention`."""
        from ..attention import self_attention_layout
        from ..attention._factors import attention_factors

        lay = self_attention_layout(self, prefix)
        shapes = {n: tuple(p.shape) for n, p in self.named_parameters()}
        if prefix:
            shapes = {f"{prefix}.{n}": s for n, s in shapes.items()}
        return attention_factors(
            lay, shapes, softmax=self.softmax, homogeneous=self.homogeneous, modules=(prefix,)
        ), []
