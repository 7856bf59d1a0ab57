"""Quantization schemes: weight-only (per-tensor, per-channel, per-group) and weight plus
per-token activation fake quantization (W8A8, W4A8), as deployments simulate them."""

from __future__ import annotations

import copy
import re
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ._quantize import (
    feature_axis,
    quantize_tensor,
    quantized_layers,
    quantized_params,
    round_to_range,
    transposed_params,
)

__all__ = [
    "QuantScheme",
    "quantize",
    "quantize_grouped",
    "quantize_per_token",
    "round_weight",
    "with_activation_rounding",
]

_SCHEME = re.compile(r"^w(\d+)(t|g(\d+))?(a(\d+))?$")


@dataclass(frozen=True)
class QuantScheme:
    """How a model is rounded: symmetric round-to-nearest weights of `weight_bits`, one step
    per tensor, per output channel or per group of `group_size` input entries of each
    output channel; with `act_bits`, the inputs of every Linear/Conv layer are rounded too,
    one step per token (per feature vector).

    `QuantScheme.parse("w4g128a8")`: `w<bits>` then optionally `t` (per tensor) or
    `g<size>` (per group; default per channel), then optionally `a<bits>`.
    """

    weight_bits: int
    granularity: str = "per-channel"
    group_size: int | None = None
    act_bits: int | None = None

    def __post_init__(self) -> None:
        for what, b in (("weight", self.weight_bits), ("activation", self.act_bits)):
            if b is not None and (not isinstance(b, int) or not 2 <= b <= 16):
                raise GaugeError(f"{what} bits must be an integer in [2, 16], got {b!r}")
        if self.granularity not in ("per-tensor", "per-channel", "per-group"):
            raise GaugeError(
                f"granularity must be per-tensor, per-channel or per-group, "
                f"got {self.granularity!r}"
            )
        if (self.granularity == "per-group") != (self.group_size is not None):
            raise GaugeError("a group size is given exactly when the granularity is per-group")
        if self.group_size is not None and self.group_size < 1:
            raise GaugeError(f"group size must be positive, got {self.group_size}")

    @classmethod
    def of(cls, scheme: QuantScheme | str) -> QuantScheme:
        """`scheme` itself, or parsed from its string form (`parse`)."""
        return cls.parse(scheme) if isinstance(scheme, str) else scheme

    @classmethod
    def parse(cls, text: str) -> QuantScheme:
        m = _SCHEME.match(text.strip().lower())
        if m is None:
            raise GaugeError(
                f"scheme {text!r}: expected w<bits>[t|g<size>][a<bits>], e.g. w4, w4t, w4g128, "
                "w8a8, w4a8"
            )
        wb, gran, gsize, _, ab = m.groups()
        granularity = "per-tensor" if gran == "t" else "per-group" if gsize else "per-channel"
        return cls(int(wb), granularity, int(gsize) if gsize else None, int(ab) if ab else None)

    def __str__(self) -> str:
        g = {"per-tensor": "t", "per-channel": ""}.get(self.granularity, f"g{self.group_size}")
        return f"w{self.weight_bits}{g}" + (f"a{self.act_bits}" if self.act_bits else "")


def quantize_grouped(w: Tensor, bits: int, group_size: int) -> Tensor:
    """Symmetric round-to-nearest with one step per group of `group_size` consecutive input
    entries of each output channel (`w` flattened to `(out, in)`). When `in` is not a
    multiple of `group_size`, the last group of each channel is shorter (a layer narrower
    than one group is rounded per channel), as grouped kernels do.

    **Returns:** a tensor of `w`'s shape and dtype.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise GaugeError(f"group size must be a positive integer, got {group_size!r}")
    flat = w.detach().reshape(w.shape[0], -1)
    pad = -flat.shape[1] % group_size  # zero padding leaves every group's range unchanged
    g = nn.functional.pad(flat, (0, pad)).reshape(flat.shape[0], -1, group_size)
    q = round_to_range(g, g.abs().amax(-1, keepdim=True), bits)
    return q.reshape(flat.shape[0], -1)[:, : flat.shape[1]].reshape(w.shape)


def quantize_per_token(x: Tensor, bits: int, dim: int = -1) -> Tensor:
    """Symmetric round-to-nearest of activations with one step per token: the maximum of
    `|x|` along the feature axis `dim` (the last for Linear inputs, 1 for Conv inputs)."""
    return round_to_range(x, x.abs().amax(dim, keepdim=True), bits)


def round_weight(
    w: Tensor, scheme: QuantScheme, transposed: bool = False, rotated: bool = False
) -> Tensor:
    """`w` rounded as `scheme` rounds a Linear/Conv weight (per tensor, channel or group);
    `transposed`: `w` is stored `(in, out)` (`transposed_params`), rounded as `wᵀ` is;
    `rotated`: a Linear weight whose input is rotated online (`rotate_inputs_online`),
    rounded as `W Rᵀ` is and expressed in the original basis, `round(W Rᵀ) R` (stored
    transposed too)."""
    if transposed:
        return round_weight(w.transpose(0, 1), scheme, rotated=rotated).transpose(0, 1)
    if rotated:
        from ._online import rotate_weight, unrotate_weight

        if w.dim() != 2:
            raise GaugeError(
                f"online rotations apply to Linear weights, not shape {tuple(w.shape)}"
            )
        return unrotate_weight(round_weight(rotate_weight(w, w.shape[1]), scheme), w.shape[1])
    if scheme.granularity == "per-group":
        return quantize_grouped(w, scheme.weight_bits, scheme.group_size)
    return quantize_tensor(w, scheme.weight_bits, scheme.granularity)


def quantize(model: nn.Module, scheme: QuantScheme | str) -> nn.Module:
    """A fake-quantized copy of `model` under `scheme`: every Linear/Conv weight rounded and,
    for weight-and-activation schemes, a forward pre-hook on each of those layers that
    rounds its input per token. Biases, norms and embeddings stay in float.

    **Arguments:** `model` (not modified); `scheme` a `QuantScheme` or its string form.

    **Returns:** the quantized copy (hooks included), in the model's own dtype.
    """
    scheme = QuantScheme.of(scheme)
    out = copy.deepcopy(model)
    names, transposed = quantized_params(out), transposed_params(out)
    if not names:
        raise GaugeError(f"{type(model).__name__} has no Linear or Conv layer to quantize")
    with torch.no_grad():
        for name in names:
            p = out.get_parameter(name)
            p.copy_(round_weight(p, scheme, name in transposed))
    return with_activation_rounding(out, scheme.act_bits) if scheme.act_bits else out


def with_activation_rounding(
    model: nn.Module,
    bits: int,
    *,
    copy_model: bool = False,
    straight_through: bool = False,
    online: Collection[str] = (),
) -> nn.Module:
    """`model` with a forward pre-hook on every Linear/Conv layer that rounds the layer's
    input per token to `bits` (`quantize_per_token`; features on the last axis for Linear,
    on axis 1 for Conv). With `straight_through`, the rounded input passes the gradient of
    the unrounded one (for learning through rounding). The Linear layers named in `online`
    round their input in the basis of their online rotation, `Rᵀ round(R x)` (what
    `rotate_inputs_online` deploys, in the original basis). Modifies `model` in place
    unless `copy_model`; returns it."""
    from ._online import rotatable, rotated_rounding

    out = copy.deepcopy(model) if copy_model else model
    layers = quantized_layers(out)
    missing = set(online) - {name for name, _ in layers}
    if missing:
        raise GaugeError(f"online rotations name layers that are not quantized: {sorted(missing)}")
    for name, m in layers:
        dim = feature_axis(m)
        if name in online and rotatable(m) is None:
            raise GaugeError(
                f"online rotations apply to Linear layers; {name!r} is {type(m).__name__}"
            )
        rnd = (
            rotated_rounding(bits, rotatable(m))
            if name in online
            else lambda x, dim=dim: quantize_per_token(x, bits, dim)
        )

        def hook(_mod, args, rnd=rnd):
            x = args[0]
            q = rnd(x)
            return (x + (q - x).detach() if straight_through else q, *args[1:])

        m.register_forward_pre_hook(hook)
    return out
