"""`certify` on models that `torch.func` cannot transform (plain autograd products), and on
float32 models whose float64 copy keeps the model's casts down in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import gaugenet
from gaugenet.certify._autograd import AutogradProducts, or_autograd
from gaugenet.certify._jacobian import flat_model, jacobian, jacobian_of
from gaugenet.certify._matrix_free import gauss_newton, linear_jvp
from gaugenet.certify._orbit import Orbit


class _OldStyleSoftplus(torch.autograd.Function):
    """Without `setup_context` (as BLOOM's GELU): `torch.func` refuses it."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return nn.functional.softplus(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class _OnceSoftplus(_OldStyleSoftplus):
    """The same, with a backward that cannot itself be differentiated."""

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        return _OldStyleSoftplus.backward(ctx, g)


class _Net(nn.Module):
    def __init__(self, act=None) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(3, 5), nn.Linear(5, 2), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(self.act.apply(h) if self.act else nn.functional.softplus(h))


def _pair(act) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    plain = _Net().double()
    custom = _Net(act).double()
    custom.load_state_dict(plain.state_dict())
    return plain, custom, torch.randn(7, 3, dtype=torch.float64)


def test_jacobian_of_an_untransformable_function_is_computed_by_reverse_mode():
    """Where `torch.func` cannot transform the model, the Jacobian is assembled one output
    at a time, and it equals that of the same function written in transformable ops."""
    plain, custom, _ = _pair(_OldStyleSoftplus)
    x = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.jacrev(lambda t: custom(t))(x)
    j_plain, j_custom = jacobian(plain, x), jacobian(custom, x)
    assert j_custom.shape == (80, 32)
    assert torch.allclose(j_custom, j_plain, rtol=0, atol=1e-14)
    # negative: a different weight gives a different Jacobian
    with torch.no_grad():
        custom.b.weight.mul_(1.5)
    assert (jacobian(custom, x) - j_plain).abs().max() > 1e-2


def test_autograd_products_equal_the_jacobian():
    """`J v` (double backward) and `Jᵀ u` (backward) by plain autograd equal the products
    with the Jacobian of the same function in transformable ops, to round-off."""
    plain, custom, x = _pair(_OldStyleSoftplus)
    jac = jacobian_of(flat_model(plain, x))
    auto = AutogradProducts(flat_model(custom, x))
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(jac.shape[1], generator=gen, dtype=torch.float64)
    u = torch.randn(jac.shape[0], generator=gen, dtype=torch.float64)
    assert (auto.jvp(v) - jac @ v).abs().max() <= 1e-13 * (jac @ v).abs().max()
    assert (auto.vjp(u) - jac.T @ u).abs().max() <= 1e-13 * (jac.T @ u).abs().max()
    # negative: another direction gives another product
    assert (auto.jvp(v + 0.1) - jac @ v).abs().max() > 1e-3


def test_gauss_newton_and_jvp_fall_back_where_torch_func_refuses():
    """`gauss_newton` and `linear_jvp` run on the untransformable model (before, a raw
    `RuntimeError` from `torch.func`) and give the products of the transformable twin."""
    plain, custom, x = _pair(_OldStyleSoftplus)
    fp, fc = flat_model(plain, x), flat_model(custom, x)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vjp(fc.f, fc.theta)
    n = fp.theta.numel()
    none = Orbit(torch.zeros(0, n, dtype=torch.float64))
    v = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = gauss_newton(fp, none)(v)
    for jvp in (None, linear_jvp(fc, trace=False), linear_jvp(fc)):
        got = gauss_newton(fc, none, jvp)(v)
        assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_a_backward_that_cannot_be_differentiated_is_a_gauge_error():
    """No forward mode and no differentiable backward (`once_differentiable`, whose part of
    the double backward is dropped silently, the product off by 30 %): a clear `GaugeError`
    on the first product, not a wrong one."""
    _, custom, x = _pair(_OnceSoftplus)
    n = flat_model(custom, x).theta.numel()
    for product, size in (("jvp", n), ("vjp", 14)):
        auto = AutogradProducts(flat_model(custom, x))
        with pytest.raises(gaugenet.GaugeError, match="backward is not differentiable.*disagree"):
            getattr(auto, product)(torch.ones(size, dtype=torch.float64))


def test_or_autograd_raises_every_other_error():
    def broken(x):
        raise RuntimeError("shape mismatch")

    op = or_autograd(broken, lambda: lambda x: x)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        op(torch.ones(2))


def _tiny(name: str, **cfg) -> tuple[nn.Module, dict]:
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{name}Config")(**cfg)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}Model")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ids = torch.randint(0, 24, (4, 6), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


def test_float32_bloom_certifies_by_products():
    """BLOOM's GELU is an `autograd.Function` without `setup_context`. On a float32 BLOOM
    with few inputs `certify` raised `torch.func`'s `RuntimeError`; now every factor is
    right, its tangents in `ker J` to round-off (its float32 softmax kept in float64 in
    the float64 copy: before, the shifts' tangents left `ker J` by 5e-9)."""
    model, inputs = _tiny("Bloom", vocab_size=24, hidden_size=8, n_layer=1, n_head=2)
    group = gaugenet.symmetries(model, inputs)
    report = gaugenet.certify(model, inputs, group=group)
    assert report.verdict == "right", report
    assert max(report.tangent_residuals.values()) < 1e-13
    assert any("float64 copy of this torch.float32 model" in n for n in report.notes)


def test_float32_head_norm_kernel_is_measured_in_float64():
    """Persimmon normalizes each head's queries and keys with a LayerNorm. On a float32
    model the kernel `u` (exactly `1`) was measured in float32 (error 1e-7) and certify
    called the factor wrong; it is now measured on a float64 copy of the path."""
    model, inputs = _tiny(
        "Persimmon",
        vocab_size=24,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    group = gaugenet.symmetries(model, inputs)
    kernels = [f for f in group.factors if f.name.endswith("norm_kernel")]
    assert len(kernels) == 2
    for f in kernels:
        (term,) = f.terms
        assert term.u.dtype == torch.float64
        assert (term.u - 1).abs().max() < 1e-12
    report = gaugenet.certify(model, inputs, group=group)
    assert report.verdict == "right", report
    assert max(report.tangent_residuals[f.name] for f in kernels) < 1e-13
    # negative: a kernel vector 1e-4 off `1` leaves ker J measurably (1.5e-8)
    bad = kernels[0].terms[0]
    object.__setattr__(bad, "u", bad.u + 1e-4 * torch.arange(bad.u.shape[1]))
    worse = gaugenet.certify(model, inputs, group=group)
    assert worse.verdict == "wrong"
    assert worse.tangent_residuals[kernels[0].name] > 1e-9


class _Coupled(nn.Module):
    """The samples are not independent: each output is centred over the batch."""

    def __init__(self, act=None) -> None:
        super().__init__()
        self.net = _Net(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y - y.mean(0)


def test_looped_jacobian_goes_sample_by_sample_only_where_samples_are_independent():
    """Without `torch.func`, the Jacobian is assembled one backward pass per output, on one
    sample's graph at a time where the samples are independent (checked), else on the whole
    batch; both equal the transformable twin's Jacobian."""
    from gaugenet.certify._jacobian import _looped_per_sample

    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    for coupled in (False, True):
        plain = (_Coupled() if coupled else _Net()).double()
        custom = (_Coupled(_OldStyleSoftplus) if coupled else _Net(_OldStyleSoftplus)).double()
        custom.load_state_dict(plain.state_dict())
        fm = flat_model(custom, x)
        per_sample = _looped_per_sample(fm)
        assert (per_sample is None) == coupled
        ref = jacobian_of(flat_model(plain, x))
        got = jacobian_of(fm)
        assert (got - ref).abs().max() <= 1e-13 * ref.abs().max()
