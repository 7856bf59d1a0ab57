"""Image batches and a data-dependent calibration for the CNN rows of `coverage_models.py`,
so that the Jacobian's `n_params − rank J` is the model's redundancy and not that of
inputs or weights that leave parts of the network idle.

- `images`: a mixture of white noise, smooth fields and sparse masks, with per-image
  contrast over an order of magnitude and per-channel offsets. On plain unit noise, ReLU
  units of narrow random CNNs can be active only at the image border, or a max-pool pick
  the same corner of a 2 × 2 map every time, so that kernel taps have no effect.
- `calibrate`: BatchNorm statistics from the batch (what training leaves), then every
  affine channel (convolution or linear bias, BatchNorm shift) shifted so that a random
  30-70 % of its outputs on the batch are negative, and, with `spread`, scaled so that its
  90th percentile is `spread`. With random weights of unit gain, channels of these narrow
  networks are otherwise dead or always active on *every* input (a ReLU's outputs are
  non-negative, so a channel whose weights share one sign never changes state), and
  ReLU6 units never reach 6 on any input (a ReLU6 bounds what it feeds by 6): those are
  redundancies of the weights, which no input can remove, and would hide the breaking of
  the rescalings by ReLU6's saturation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["calibrate", "images"]

F64 = torch.float64


def images(n: int, c: int, h: int, w: int, seed: int) -> Tensor:
    """`(n, c, h, w)` float64 images: a third white noise, a third smooth (bilinear from a
    quarter resolution), a third smooth over the whole image (from 2 × 2), each with a
    random share (20-100 %) of its pixels kept, contrast `exp(U(-1, 2))` and a standard
    normal offset per channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=F64)
    kind = torch.rand(n, 1, 1, 1, generator=g, dtype=F64)
    for k, size in enumerate((max(h // 4, 1), 2), start=1):
        coarse = torch.randn(n, c, size, size, generator=g, dtype=F64)
        smooth = 2 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        x = torch.where(kind < k / 3, x, smooth)
    share = 0.2 + 0.8 * torch.rand(n, 1, 1, 1, generator=g, dtype=F64)
    x = x * (torch.rand(n, 1, h, w, generator=g, dtype=F64) < share)
    contrast = torch.exp(torch.empty(n, 1, 1, 1, dtype=F64).uniform_(-1.0, 2.0, generator=g))
    return contrast * x + torch.randn(n, c, 1, 1, generator=g, dtype=F64)


def _channels(m: nn.Module, y: Tensor) -> Tensor:
    """`(channels, values)`: the outputs of `m` per output channel."""
    axis = -1 if isinstance(m, nn.Linear) else 1
    return y.movedim(axis, 0).reshape(y.shape[axis], -1)


def _between(v: Tensor, q: float) -> Tensor:
    """A value between two consecutive distinct values of `v` near its `q`-quantile: none
    of `v` equals it (inputs with blank regions repeat values, and a channel shifted by one
    of them would put those values at the ReLU's kink, where the Jacobian is undefined)."""
    u = torch.unique(v)  # sorted
    k = int(torch.searchsorted(u, torch.quantile(v, q)))
    k = min(max(k, 1), len(u) - 1)
    return (u[k - 1] + u[k]) / 2


def calibrate(model: nn.Module, x: Tensor, spread: float | None = None, seed: int = 0) -> nn.Module:
    """`model` (float64, eval mode) with BatchNorm statistics from `x`, then each channel of
    every layer with a bias shifted (and with `spread`, scaled) on `x`, layer after layer in
    the order they run (see the module docstring). Returns `model`, changed in place."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative: the statistics of the whole batch
        model.train()
        with torch.no_grad():
            model(x)
        model.eval()
        for m in norms:
            m.momentum = 0.1

    def hook(m: nn.Module, args: Any, y: Tensor) -> Tensor:
        per = _channels(m, y)
        q = 0.3 + 0.4 * torch.rand(per.shape[0], generator=g, dtype=F64)
        mid = torch.stack([_between(v, float(t)) for v, t in zip(per, q)])
        scale = torch.ones_like(mid)
        if spread is not None:
            top = torch.quantile(per - mid[:, None], 0.9, dim=1)
            scale = spread / top.clamp_min(1e-12)
        shape = [1] * m.weight.ndim
        shape[1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0] = -1
        m.weight.mul_(scale.reshape(shape))
        m.bias.copy_(scale * (m.bias - mid))
        axis = -1 if isinstance(m, nn.Linear) else 1
        view = [1] * y.ndim
        view[axis] = -1
        return scale.reshape(view) * (y - mid.reshape(view))

    layers = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, layers) and getattr(m, "bias", None) is not None
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return model
