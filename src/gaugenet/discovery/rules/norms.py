"""Normalizations: BatchNorm (eval mode), LayerNorm, GroupNorm and InstanceNorm.

BatchNorm with running statistics is affine per channel: it absorbs its input's scales and
is a source of fresh ones. LayerNorm fixes its input's scales (it subtracts the mean over
its features) and is a source; the patterns around it (β shift, kernel, centering,
embedding sums) run from here (see `_norm_rules.py` and `patterns.py`). GroupNorm and
InstanceNorm fix their inputs' labels, remove a convolution bias right before them (their
mean subtraction), and their affine part is a per-channel source. RMSNorm written as
primitive operations is covered by the arithmetic rules (`x * rsqrt(mean(x²)) * γ`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from .._labels import ZERO
from .._offset import layernorm_offset
from .._offset_layernorm import gain_offset
from .._shifts import AbsorbedShiftFactor, GroupShiftFactor, IntoBatchNorm, RemovedByNorm
from ._common import Pair, broadcast_channels, scale_reps
from ._examples import batch, seeded
from ._rule import Example, Rule
from .linear import CONV

if TYPE_CHECKING:
    from .._propagate import Propagator

__all__ = ["RULES"]

BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: InstanceNorm3d is traced into (it is not atomic): kept so, as before the registry
IN = (nn.InstanceNorm1d, nn.InstanceNorm2d)


def batchnorm(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    m = prop.submodule(n)
    _, (s, p) = prop.first(n)
    lab = _batchnorm(prop, str(n.target), m, s, p, out)
    _bias_before_bn(prop, n, m)
    return lab


def _batchnorm(
    prop: Propagator, name: str, m: nn.Module, s: Tensor, p: Tensor, out: Tensor
) -> Pair:
    L = prop.L
    uses_batch_stats = m.training or not m.track_running_stats
    reps = scale_reps(L, s, 1)
    if uses_batch_stats:
        L.fix_scales(s, name, "BatchNorm in training mode normalizes with batch statistics")
    elif not m.affine:
        L.fix_scales(s, name, "BatchNorm without affine parameters cannot absorb a scale")
    else:
        L.scale_terms.append(("bnshift", name, float(m.eps), reps))
    pcols = L.per_channel(p, 1)
    perm_ok = all(len(c) <= 1 for c in pcols)
    pids = torch.tensor([int(c[0]) if len(c) else ZERO for c in pcols])
    if not perm_ok:
        L.fix_perms(p, name, "channels mixed before BatchNorm")
    else:
        names = [f"{name}.running_mean", f"{name}.running_var"] if m.track_running_stats else []
        if m.affine:
            names += [f"{name}.weight", f"{name}.bias"]
        for q in names:
            L.perm_terms.append((q, 0, pids))
    if not m.affine:
        return torch.zeros_like(s), p
    prop.use_param(f"{name}.weight", name)
    prop.use_param(f"{name}.bias", name)
    fresh = L.fresh(m.num_features, name + ":out")
    L.scale_terms.append((f"{name}.weight", fresh, 1))
    L.scale_terms.append((f"{name}.bias", fresh, 1))
    if perm_ok:
        L.links.append((fresh, pids))
    return broadcast_channels(fresh, out.shape, 1), p


def _bias_before_bn(prop: Propagator, n: fx.Node, bn: nn.Module) -> None:
    """A bias right before eval-mode affine BatchNorm is absorbed by its shift `β`."""
    prod = prop.sole_producer(n, (nn.Linear, *CONV))
    if prod is None or bn.training or not bn.track_running_stats or not bn.affine:
        return
    name, m = prod
    if m.bias is None or (isinstance(m, CONV) and m.weight.shape[0] != bn.num_features):
        return
    term = IntoBatchNorm(f"{name}.bias", str(n.target), float(bn.eps))
    prop.L.extra.append(
        AbsorbedShiftFactor(
            f"shift:{name}", bn.num_features, terms=(term,), modules=(name, str(n.target))
        )
    )


def layernorm(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    m = prop.submodule(n)
    _, (s, p) = prop.first(n)
    prop.layernorm_shift(n, m)
    prop.layernorm_kernel(n, m)
    layernorm_offset(prop, n, m)
    prop.centered_inputs(n, m)
    prop.embedding_sum(n)
    return _layernorm(prop, str(n.target), m, s, p, out)


def _layernorm(
    prop: Propagator, name: str, m: nn.LayerNorm, s: Tensor, p: Tensor, out: Tensor
) -> Pair:
    L = prop.L
    L.fix_scales(s, name, "LayerNorm subtracts the mean over its features")
    k = len(m.normalized_shape)
    if k == 1:
        pcols = L.per_channel(p, -1)
        pids = torch.tensor([int(c[0]) if len(c) == 1 else ZERO for c in pcols])
        if any(len(c) > 1 for c in pcols):
            L.fix_perms(p, name, "channels mixed before LayerNorm")
    else:
        L.fix_perms(p, name, "LayerNorm over several dimensions")
        pids = None
    if not m.elementwise_affine:
        return torch.zeros_like(s), p
    prop.use_param(f"{name}.weight", name)
    fresh = L.fresh(m.weight.numel(), name + ":out").reshape(m.weight.shape)
    off = gain_offset(m)  # a gain stored as `w + c` moves as `α (w + c) − c`
    L.scale_terms.append((f"{name}.weight", fresh, 1, off) if off else (f"{name}.weight", fresh, 1))
    if m.bias is not None:
        prop.use_param(f"{name}.bias", name)
        L.scale_terms.append((f"{name}.bias", fresh, 1))
    if pids is not None:
        for q in [f"{name}.weight"] + ([f"{name}.bias"] if m.bias is not None else []):
            L.perm_terms.append((q, 0, pids))
        L.links.append((fresh.reshape(-1), pids))
    return fresh.expand(out.shape).clone(), p


def mean_removal_norm(prop: Propagator, n: fx.Node, out: Tensor) -> Pair:
    """GroupNorm and InstanceNorm: the labels reaching them are fixed (they normalize with
    the sample's statistics over groups of channels), a convolution bias right before one
    is removed by its mean subtraction, and their affine part `γ_c n + β_c` is a source of a
    fresh scale per channel (on axis 1), as a LayerNorm's is per feature."""
    m = prop.submodule(n)
    _, (s, p) = prop.first(n)
    _bias_before_mean_removal(prop, n, m)
    name, L = str(n.target), prop.L
    kind = type(m).__name__
    L.fix_scales(s, name, f"{kind} normalizes its input")
    L.fix_perms(p, name, f"{kind}: channel permutations are not followed through it")
    if m.weight is None or out.ndim < 2:
        return torch.zeros_like(s), p
    C = m.weight.numel()
    prop.use_param(f"{name}.weight", name)
    fresh = L.fresh(C, name + ":out")
    L.scale_terms.append((f"{name}.weight", fresh, 1))
    if m.bias is not None:
        prop.use_param(f"{name}.bias", name)
        L.scale_terms.append((f"{name}.bias", fresh, 1))
    shape = (1, C) + (1,) * (out.ndim - 2)
    return fresh.reshape(shape).expand(out.shape).clone(), p


def _bias_before_mean_removal(prop: Propagator, n: fx.Node, norm: nn.Module) -> None:
    """A convolution's bias right before an InstanceNorm (per channel) or a GroupNorm
    (per group, equal over its channels) that normalizes with the sample's own statistics:
    the mean subtraction removes the shift."""
    prod = prop.sole_producer(n, CONV)
    if prod is None:
        return
    if isinstance(norm, nn.GroupNorm):
        channels, groups = norm.num_channels, norm.num_groups
    else:
        if norm.track_running_stats and not norm.training:
            return  # eval mode with running statistics: the mean is not the sample's
        channels = groups = norm.num_features
    name, m = prod
    if m.bias is None or m.weight.shape[0] != channels:
        return
    term = RemovedByNorm(f"{name}.bias", channels // groups)
    cls = GroupShiftFactor if groups != channels else AbsorbedShiftFactor
    prop.L.extra.append(cls(f"shift:{name}", groups, terms=(term,), modules=(name,)))


# -- examples ---------------------------------------------------------------------------------
def _bn_cnn() -> tuple[nn.Module, Any]:
    model = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1)
        )
    )
    bn = model[1]
    g = torch.Generator().manual_seed(2)
    bn.running_mean.copy_(torch.rand(3, generator=g, dtype=torch.float64) - 0.5)
    bn.running_var.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
    return model, batch(16, 2, 4, 4)


def _ln_first() -> tuple[nn.Module, Any]:
    model = seeded(lambda: nn.Sequential(nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2)))
    return model, batch(64, 4)


def _norm_cnn(norm: nn.Module) -> tuple[nn.Module, Any]:
    model = seeded(
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(4, 2, 1))
    )
    return model, batch(16, 2, 4, 4)


RULES = (
    Rule(
        "batchnorm",
        "norms",
        batchnorm,
        (
            Example(
                _bn_cnn,
                9,
                "the convolution's 3 channel scales pass into BatchNorm, its own 3 into the "
                "last convolution, and the convolution's bias moves into β (3)",
            ),
        ),
        modules=BN,
    ),
    Rule(
        "layernorm",
        "norms",
        layernorm,
        (Example(_ln_first, 4, "γ and β of each of the 4 features scaled, undone after ReLU"),),
        modules=(nn.LayerNorm,),
    ),
    Rule(
        "groupnorm and instancenorm",
        "norms",
        mean_removal_norm,
        (
            Example(
                lambda: _norm_cnn(nn.GroupNorm(2, 4)),
                6,
                "the convolution's bias moves freely by one constant per group (2), and "
                "the norm's 4 channel scales (γ, β) are undone after ReLU (4)",
            ),
            Example(
                lambda: _norm_cnn(nn.InstanceNorm2d(4, affine=True)),
                8,
                "the convolution's bias is removed per channel (4), and the norm's 4 channel "
                "scales (γ, β) are undone after ReLU (4)",
            ),
        ),
        modules=(nn.GroupNorm, *IN),
    ),
)
