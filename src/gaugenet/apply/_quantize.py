"""Symmetric round-to-nearest weight quantization, to measure what a gauge choice buys."""

from __future__ import annotations

import copy
import sys

import torch
from torch import Tensor, nn

from .._errors import GaugeError

__all__ = [
    "GRANULARITIES",
    "quantize_dynamic_int8",
    "quantize_tensor",
    "quantize_weights",
    "quantized_params",
    "transposed_params",
]

GRANULARITIES = ("per-tensor", "per-channel")

# The layers whose weight matrices a deployment stores in low precision; biases, norms and
# embeddings stay in float (as in the usual weight-only and int8 integer pipelines).
_QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _transposed_layers() -> tuple[type, ...]:
    """Linear layers that store their weight as `(in, out)` and compute `x W + b`:
    `transformers`' `Conv1D` (GPT-2 and its relatives), when `transformers` is loaded (a
    model built from it has loaded it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(mod, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of the layers whose weights a deployment rounds: Linear and Conv,
    and Linear layers stored transposed (`transposed_params`)."""
    kinds = _QUANTIZED_LAYERS + _transposed_layers()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def feature_axis(layer: nn.Module) -> int:
    """The axis of a quantized layer's input that holds its features: 1 for a convolution
    (`(batch, channels, ...)`), the last for Linear layers, stored transposed or not."""
    return 1 if isinstance(layer, _QUANTIZED_LAYERS[1:]) else -1


def transposed_params(model: nn.Module) -> set[str]:
    """Names of the quantized weights stored `(in, out)` (output channels on axis 1): they
    are rounded per output channel and per group of inputs as their transposes are."""
    kinds = _transposed_layers()
    if not kinds:
        return set()
    return {
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules()
        if isinstance(m, kinds)
    }


def _check(bits: int, granularity: str) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise GaugeError(f"bits must be an integer in [2, 16], got {bits!r}")
    if granularity not in GRANULARITIES:
        raise GaugeError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def round_to_range(x: Tensor, r: Tensor, bits: int) -> Tensor:
    """Symmetric round-to-nearest of `x` on the grid `k · r / (2^(bits-1) − 1)`, `|k|` at most
    `2^(bits-1) − 1`; `r` the range, broadcastable to `x` (a zero range keeps step 1)."""
    qmax = 2 ** (bits - 1) - 1
    step = torch.where(r > 0, r / qmax, torch.ones_like(r))
    return torch.clamp(torch.round(x / step), -qmax, qmax) * step


def quantize_tensor(w: Tensor, bits: int, granularity: str = "per-tensor") -> Tensor:
    """Symmetric round-to-nearest fake quantization of one tensor.

    The step is `max|w| / (2^(bits-1) - 1)` over the whole tensor (`"per-tensor"`) or over
    each slice `w[o]` along axis 0 (`"per-channel"`, one step per output channel).

    **Arguments:**

    - `w`: any shape `(out, ...)`.
    - `bits`: integer width, 2 to 16.
    - `granularity`: `"per-tensor"` or `"per-channel"`.

    **Returns:** a tensor of `w`'s shape and dtype whose entries are integers times the step.
    """
    _check(bits, granularity)
    a = w.detach().abs()
    if granularity == "per-tensor" or w.dim() == 0:
        r = a.max()
    else:
        r = a.reshape(a.shape[0], -1).amax(1).reshape(-1, *([1] * (w.dim() - 1)))
    return round_to_range(w.detach(), r, bits)


def quantized_params(model: nn.Module) -> list[str]:
    """Names of the parameters `quantize_weights` rounds: the weights of Linear and Conv
    layers (`transformers`' `Conv1D` included, `transposed_params`)."""
    return [f"{name}.weight" if name else "weight" for name, _ in quantized_layers(model)]


def quantize_weights(model: nn.Module, bits: int, granularity: str = "per-tensor") -> nn.Module:
    """A copy of `model` with every Linear/Conv weight fake-quantized (`quantize_tensor`).

    **Arguments:**

    - `model`: any module; it is not modified.
    - `bits`: integer width, 2 to 16.
    - `granularity`: `"per-tensor"` or `"per-channel"` (one step per output channel).

    **Returns:** the quantized copy, in the model's own dtype (float arithmetic on rounded
    weights, so the output error is the weight-rounding error alone).
    """
    from ._schemes import QuantScheme, quantize

    _check(bits, granularity)
    return quantize(model, QuantScheme(bits, granularity))


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """Integer quantization with `torch.ao` where it applies: int8 dynamic quantization of the
    `nn.Linear` layers (per-tensor symmetric weights, activations quantized on the fly).

    **Returns:** a quantized copy (float32, CPU); the model itself is not modified.
    """
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise GaugeError(
            f"{type(model).__name__} has no nn.Linear layer: torch.ao dynamic "
            "quantization does not apply"
        )
    from torch.ao.quantization import quantize_dynamic

    m = copy.deepcopy(model).float().eval()
    return quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
