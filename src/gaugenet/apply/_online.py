"""Online input rotations: the one transformation that is not in the weights' gauge group.

A Linear layer computes `W x = (W Rᵀ)(R x)` for any orthogonal `R`. Merging `Rᵀ` into the
weight and rotating the input where it is computed, at run time, keeps the function and
spreads a token's few large features over all of them, so per-token rounding of the input
loses far less (QuaRot's online Hadamard before a down projection). Unlike the discovered
factors, `R` is not absorbed by the layer that produces `x` (after a gated MLP's product
nothing can absorb it), so it costs an extra `O(n log n)` transform per token and changes
the model's structure: the layer becomes `RotatedInput(linear)`. It is used only where a
caller asks for it and is always stated.

`R = H_p ⊗ M`: the Walsh–Hadamard matrix of the largest power of two `p` dividing the width
`n = p·m` (applied by the fast transform), and for the rest `m` a Hadamard matrix where one
exists (Paley's construction, `m = q + 1` for a prime `q ≡ 3 mod 4`: 12, 20, 24, ...), else
the orthonormal DCT-II matrix; both normalized to be orthogonal.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ..groups._group import parameter_aliases

__all__ = [
    "RotatedInput",
    "online_factor",
    "online_layers",
    "rotatable",
    "rotatable_layers",
    "rotate_inputs_online",
    "rotated_layers",
    "rotation_matrix",
]


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % k for k in range(2, math.isqrt(q) + 1))


def _paley(m: int) -> Tensor:
    """Paley's construction I of a Hadamard matrix of order `m = q + 1`, `q ≡ 3 (mod 4)`
    prime: `I + S` with `S` the skew conference matrix bordered from the Jacobsthal matrix
    `Q_ij = χ(j − i)` (χ the quadratic character mod `q`). Entries ±1, `H Hᵀ = m I`."""
    q = m - 1
    squares = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if k in squares else -1.0 for k in range(1, q)])
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = chi.double()[idx]
    return torch.eye(m, dtype=torch.float64) + s


def _dct(m: int) -> Tensor:
    """The orthonormal DCT-II matrix of order `m`, `(m, m)` float64."""
    k, j = torch.arange(m, dtype=torch.float64)[:, None], torch.arange(m, dtype=torch.float64)
    c = torch.cos(math.pi * (2 * j + 1) * k / (2 * m)) * math.sqrt(2 / m)
    c[0] /= math.sqrt(2)
    return c


def online_factor(n: int) -> tuple[int, Tensor]:
    """`(p, M)` with `n = p · m`, `p` the largest power of two dividing `n` and `M` `(m, m)`
    float64 orthogonal: Paley's Hadamard matrix over `√m` where `m − 1` is a prime
    `≡ 3 (mod 4)`, else the DCT-II matrix (`M = [[1]]` for `m = 1`). The rotation is
    `H_p ⊗ M`, `H_p` the normalized Walsh–Hadamard matrix. Built once per width (the
    objective rounds rotated weights at every evaluation); `M` is a fresh copy."""
    if not isinstance(n, int) or n < 1:
        raise GaugeError(f"a rotation needs a positive width, got {n!r}")
    p, small = _factor(n)
    return p, small.clone()


@functools.lru_cache(maxsize=64)
def _factor(n: int) -> tuple[int, Tensor]:
    p = n & -n
    m = n // p
    for k in range(p.bit_length()):  # move powers of two back from p if m·2^k is a Paley order
        mm = m << k
        q = mm - 1
        if p % (1 << k) == 0 and mm <= 256 and q % 4 == 3 and _is_prime(q):
            return p >> k, _paley(mm) / math.sqrt(mm)
    return p, _dct(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)


def rotatable(layer: nn.Module) -> int | None:
    """The input width of a layer whose input can be rotated online: an `nn.Linear`
    (weight `(out, in)`), or a Linear layer stored transposed (`transformers`' `Conv1D`,
    weight `(in, out)`); `None` for anything else (a convolution mixes positions too)."""
    from ._quantize import _transposed_layers

    if type(layer) is nn.Linear:
        return layer.in_features
    if isinstance(layer, _transposed_layers()):
        return layer.weight.shape[0]
    return None


def rotatable_layers(model: nn.Module) -> tuple[str, ...]:
    """The names of `model`'s layers whose input can be rotated online (`rotatable`), in
    the model's order, but those whose weight another module shares (a language model's
    head tied to its token table: `W Rᵀ` there would rotate the table's rows too)."""
    aliases = parameter_aliases(model)
    return tuple(
        n for n, m in model.named_modules() if rotatable(m) and len(aliases[id(m.weight)]) == 1
    )


def _as_out_in(layer: nn.Module) -> Tensor:
    """A rotatable layer's weight as `(out, in)` (a view; `Conv1D` stores its transpose)."""
    w = layer.weight
    return w if type(layer) is nn.Linear else w.transpose(0, 1)


def _fwht(x: Tensor, axis: int) -> Tensor:
    """The normalized Walsh–Hadamard transform of `x` along `axis` (a power-of-two length),
    by `log₂ p` butterfly stages (no `p × p` matrix)."""
    x = x.movedim(axis, -1)
    shape, p = x.shape, x.shape[-1]
    y, h = x.reshape(-1, p), 1
    while h < p:
        y = y.reshape(-1, p // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), 2)
        h *= 2
    return (y.reshape(shape) / math.sqrt(p)).movedim(-1, axis)


def _rotate(x: Tensor, p: int, small: Tensor) -> Tensor:
    """`(H_p ⊗ M) x` along the last axis of `x` `(..., p·m)`: the input viewed `(p, m)`,
    `H_p X Mᵀ`."""
    m = small.shape[0]
    y = x.reshape(*x.shape[:-1], p, m)
    if m > 1:
        y = y @ small.to(x.dtype).T
    if p > 1:
        y = _fwht(y, -2)
    return y.reshape(x.shape)


def rotation_matrix(n: int) -> Tensor:
    """The dense orthogonal rotation `H_p ⊗ M` of width `n` (`online_factor`), `(n, n)`
    float64; `RotatedInput` applies it without forming it."""
    p, small = online_factor(n)
    return _rotate(torch.eye(n, dtype=torch.float64), p, small).T


class RotatedInput(nn.Module):
    """`linear` applied to its input rotated online: `forward(x) = linear(R x)`, with
    `linear`'s weight already `W Rᵀ`, so the pair computes `W x` (`rotate_inputs_online`).

    `linear` is an `nn.Linear` or a Linear layer stored transposed (`transformers`'
    `Conv1D`, its weight then `R Wᵀ`). The rotation `R = H_p ⊗ M` is applied by the fast
    Walsh–Hadamard transform and a small dense `M` (buffer `small`, `(m, m)`); `linear` is
    the layer that quantization rounds, its input the rotated one."""

    def __init__(self, linear: nn.Module, p: int, small: Tensor) -> None:
        super().__init__()
        n = rotatable(linear)
        if n is None:
            raise GaugeError(
                f"online rotations apply to Linear layers, not {type(linear).__name__}"
            )
        if p * small.shape[0] != n:
            raise GaugeError(
                f"rotation of width {p}×{small.shape[0]} does not fit a layer of {n} inputs"
            )
        self.linear, self.p = linear, p
        self.register_buffer("small", small.to(linear.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(_rotate(x, self.p, self.small))

    def extra_repr(self) -> str:
        return f"online rotation H_{self.p} ⊗ M_{self.small.shape[0]}"


def rotated_layers(model: nn.Module) -> list[str]:
    """Names of the layers of `model` that rotate their input online (`RotatedInput`)."""
    return [name for name, m in model.named_modules() if isinstance(m, RotatedInput)]


def rotate_inputs_online(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """A copy of `model` in which each Linear named in `layers` is replaced by
    `RotatedInput` (its weight `W Rᵀ`, its input rotated online by `R`): the same function,
    a different structure. Raises `GaugeError` for a name that is not a Linear layer or
    whose weight another layer shares (`rotatable_layers`)."""
    out = copy.deepcopy(model)
    free = set(rotatable_layers(out))
    for name in layers:
        if not name:
            raise GaugeError("the model itself is the Linear layer: rotate it inside a container")
        try:
            layer = out.get_submodule(name)
        except AttributeError:
            raise GaugeError(f"no layer {name!r} to rotate online") from None
        n = rotatable(layer)
        if n is None:
            raise GaugeError(
                f"{name!r} is a {type(layer).__name__}: online rotations apply to Linear layers"
            )
        if name not in free:
            raise GaugeError(
                f"{name!r} shares its weight with another layer (tied): rotating it online "
                "would change that layer too"
            )
        p, small = online_factor(n)
        with torch.no_grad():
            w = _as_out_in(layer)
            w.copy_(_rotate(w.double(), p, small).to(w.dtype))
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, RotatedInput(layer, p, small))
    return out


def rotate_weight(w: Tensor, n_in: int) -> Tensor:
    """`W Rᵀ` for a weight `(out, n_in)` (rows rotated as inputs are)."""
    p, small = online_factor(n_in)
    return _rotate(w, p, small)


def unrotate_weight(w: Tensor, n_in: int) -> Tensor:
    """`W' R`: the inverse of `rotate_weight` (`Rᵀ = H_p ⊗ Mᵀ`, `H_p` symmetric)."""
    p, small = online_factor(n_in)
    return _rotate(w, p, small.T)


def rotated_rounding(bits: int, n_in: int) -> Callable[[Tensor], Tensor]:
    """`x ↦ Rᵀ round(R x)`: per-token rounding of an input in the rotated basis, expressed
    in the original one (what a rotated layer's rounded input contributes)."""
    from ._schemes import quantize_per_token

    p, small = online_factor(n_in)

    def fn(x: Tensor) -> Tensor:
        return _rotate(quantize_per_token(_rotate(x, p, small), bits, -1), p, small.T)

    return fn


def online_layers(
    model: nn.Module, inputs: Any, scheme: Any, *, gain: float = 2.0
) -> dict[str, tuple[float, float]]:
    """The Linear layers of `model` whose rounding error an online input rotation cuts by
    at least the factor `gain`, with that error without and with it.

    Each layer's error is measured where it arises, on `inputs` (the calibration data):
    `‖Q(x) Q(W)ᵀ − x Wᵀ‖²` summed over tokens, `Q` the rounding of `scheme` (the weight's,
    and with its `act_bits` the input's per token), against the same with `R x` and `W Rᵀ`.
    A layer whose input is already spread (after a rotated residual stream, say) gains
    little and is left alone, so only the rotations that pay for their run-time cost are
    proposed; the caller still judges them on the model's output.

    **Returns:** `{layer name: (error, error rotated)}` of the chosen layers (a layer called
    several times sums over its calls), in the model's order.
    """
    from ._schemes import QuantScheme, quantize_per_token, round_weight
    from ._search import _each_input

    sch = QuantScheme.of(scheme)
    if not gain >= 1:
        raise GaugeError(f"gain must be at least 1, got {gain}")
    layers = {f"{n}.weight": model.get_submodule(n) for n in rotatable_layers(model)}
    if not layers:
        raise GaugeError(f"{type(model).__name__} has no Linear layer to rotate online")
    rounded: dict[str, tuple[Tensor, Tensor, Tensor, int, Tensor]] = {}
    for key, layer in layers.items():
        p, small = online_factor(rotatable(layer))
        w = _as_out_in(layer).detach().double()
        rounded[key] = (w, round_weight(w, sch), round_weight(_rotate(w, p, small), sch), p, small)
    errors: dict[str, list[float]] = {}

    def rounded_input(x: Tensor) -> Tensor:
        return quantize_per_token(x, sch.act_bits, -1) if sch.act_bits else x

    def take(key: str, x: Tensor) -> None:
        w, wq, wr, p, small = rounded[key]
        y = x @ w.T
        plain = float(((rounded_input(x) @ wq.T - y) ** 2).sum())
        rot = float(((rounded_input(_rotate(x, p, small)) @ wr.T - y) ** 2).sum())
        acc = errors.setdefault(key.removesuffix(".weight"), [0.0, 0.0])
        acc[0], acc[1] = acc[0] + plain, acc[1] + rot

    _each_input(model, inputs, list(layers), take, magnitude=False)
    return {n: (e, r) for n, (e, r) in errors.items() if r * gain <= e and e > 0}
