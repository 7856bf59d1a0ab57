"""The algorithms behind `certify`: the two-stage Gram singular values, the per-sample
Jacobian, the orbit projector, the K-FAC preconditioner and the preconditioned Davidson
certificate, each against a plain reference, with negative tests."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet import GaugeError
from gaugenet.certify import functional_dimension, matrix_free_certificate
from gaugenet.certify._functional_dimension import singular_values
from gaugenet.certify._jacobian import _per_sample_jacobian, flat_model, jacobian
from gaugenet.certify._kfac import preconditioner
from gaugenet.certify._orbit import Orbit

# `gaugenet.certify` the attribute is the function: reach the modules themselves

F64 = torch.float64


def _mlp(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def _balanced_mlp(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    """Unit-gain weights and each bias at minus the median pre-activation, so every unit is
    active on about half of the standard normal inputs: no hidden redundancy."""
    model = _mlp(widths, seed)
    x = _inputs(2000, widths[0], seed + 100)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features**-0.5)
                m.bias.copy_(-(x @ m.weight.T).median(0).values)
            x = m(x)
    return model


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rank(s: torch.Tensor, rtol: float = 1e-9) -> int:
    return int((s > rtol * s[0]).sum())


def _plain_gram(jac: torch.Tensor) -> torch.Tensor:
    """The naive method: square roots of the eigenvalues of JᵀJ."""
    return torch.linalg.eigvalsh(jac.T @ jac).clamp_min(0).sqrt().flip(0)


def _synthetic(m: int, n: int, sigmas: torch.Tensor, seed: int) -> torch.Tensor:
    """`(m, n)` with singular values `sigmas` (padded with zeros) and random vectors."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64)).Q
    s = torch.zeros(n, dtype=F64)
    s[: sigmas.numel()] = sigmas
    return (u * s) @ v.T


# -- two-stage Gram singular values ------------------------------------------------


def _models() -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Jacobians with a kernel (symmetries), tiny nonzero singular values, hidden
    redundancy."""
    out = []
    base = _mlp((6, 12, 9, 3), 0)
    out.append(("mlp", base, _inputs(120, 6, 1)))
    for c in (1e-4, 1e-6):  # tiny outgoing weights of one unit: its incoming ones scale by c
        scaled = _mlp((6, 12, 9, 3), 0)
        with torch.no_grad():
            scaled[2].weight[:, 0] *= c
        out.append((f"scaled {c:g}", scaled, _inputs(120, 6, 1)))
    rare = _mlp((4, 10, 3), 2)  # unit 0 active on a few inputs only
    x = _inputs(150, 4, 3)
    with torch.no_grad():
        pre = x @ rare[0].weight[0]
        rare[0].bias[0] = -pre.sort(descending=True).values[3]
    out.append(("rarely active unit", rare, x))
    dead = _mlp((4, 10, 3), 4)
    with torch.no_grad():
        dead[0].bias[1] = -100.0
    out.append(("dead unit", dead, _inputs(150, 4, 5)))
    return out


@pytest.mark.parametrize("case", range(5), ids=lambda i: _models()[i][0])
def test_gram_rank_and_gap_match_svd(case: int) -> None:
    _, model, x = _models()[case]
    jac = jacobian(model, x)
    ref = torch.linalg.svdvals(jac)
    s, used = singular_values(jac, algorithm="gram")
    assert used == "gram"
    assert _rank(s) == _rank(ref)
    r = _rank(ref)
    # the kept singular values agree to many digits, the smallest included
    assert torch.allclose(s[:r], ref[:r], rtol=1e-7, atol=0)
    # all of them, the dropped ones included, within 1e-7 relative or 1e-12 sigma_max
    assert torch.allclose(s, ref, rtol=1e-7, atol=1e-12 * float(ref[0]))
    assert r < len(s)  # every case has a kernel (at least the hidden units' rescalings)
    gap, gap_ref = float(s[r - 1] / s[r]), float(ref[r - 1] / ref[r])
    assert (gap > 1e3) == (gap_ref > 1e3)
    # negative: the plain Gram method counts part of the kernel (noise at ~1e-8 sigma_max)
    assert _rank(_plain_gram(jac)) > r


def test_gram_keeps_singular_value_at_1e7() -> None:
    """A singular value at 1e-7 sigma_max counts (rtol 1e-9) and keeps several digits; the
    plain Gram method loses it: its kernel comes out at about sqrt(eps) sigma_max."""
    sig = torch.cat([torch.linspace(1.0, 0.1, 150, dtype=F64), torch.tensor([1e-7], dtype=F64)])
    jac = _synthetic(400, 200, sig, 0)  # rank 151, a kernel of 49
    s, used = singular_values(jac, algorithm="gram")
    assert used == "gram"
    assert _rank(s) == 151 == _rank(torch.linalg.svdvals(jac))
    assert float(s[150]) == pytest.approx(1e-7, rel=1e-5)
    assert float(s[151]) < 1e-12
    # negative: squaring loses it: the kernel comes out at ~2e-8 sigma_max and is counted
    naive = _plain_gram(jac)
    assert _rank(naive) > 151 and float(naive[151]) > 1e-9


def test_gram_falls_back_without_a_gap() -> None:
    """Singular values spread evenly over twelve decades: no cut converges quickly, so the
    plain SVD answers (same result, honestly labelled)."""
    jac = _synthetic(500, 400, torch.logspace(0, -12, 400, dtype=F64), 1)
    s, used = singular_values(jac, algorithm="gram")
    assert used == "svd"
    assert torch.equal(s, torch.linalg.svdvals(jac))


def test_gram_wide_matrix_and_auto() -> None:
    jac = _synthetic(300, 200, torch.linspace(2.0, 1.0, 120, dtype=F64), 2).T  # (200, 300)
    s, used = singular_values(jac, algorithm="gram")
    assert used == "gram" and s.shape == (200,)
    assert torch.allclose(s, torch.linalg.svdvals(jac), rtol=1e-8, atol=1e-12)
    assert singular_values(jac)[1] == "svd"  # small: auto takes the plain SVD


def test_singular_values_bad_input() -> None:
    with pytest.raises(GaugeError, match="algorithm"):
        singular_values(torch.eye(3, dtype=F64), algorithm="qr")  # type: ignore[arg-type]
    with pytest.raises(GaugeError, match="matrix"):
        singular_values(torch.ones(3, dtype=F64))


def test_functional_dimension_gram_equals_svd() -> None:
    model, x = _balanced_mlp((5, 16, 12, 3), 3), _inputs(200, 5, 4)
    a = functional_dimension(model, x, algorithm="gram")
    b = functional_dimension(model, x, algorithm="svd")
    assert (a.algorithm, b.algorithm) == ("gram", "svd")
    assert a.rank == b.rank == a.n_params - 28  # 28 hidden units: one rescaling each
    assert a.sigma_last == pytest.approx(b.sigma_last, rel=1e-8)
    assert a.gap > 1e9 and b.gap > 1e9
    with pytest.raises(GaugeError, match="rtol"):
        functional_dimension(model, x, rtol=0.0)


# -- per-sample Jacobian -----------------------------------------------------------


def test_per_sample_jacobian_equals_whole_batch() -> None:
    model, x = _mlp((4, 7, 3), 5), _inputs(40, 4, 6)
    fm = flat_model(model, x)
    fast = _per_sample_jacobian(fm)
    assert fast is not None
    assert torch.allclose(fast, torch.func.jacrev(fm.f)(fm.theta), rtol=0, atol=1e-13)


def test_per_sample_jacobian_refused_when_samples_interact() -> None:
    """Negative: BatchNorm in training mode mixes the samples; the check catches it and
    `jacobian` falls back to the whole-batch Jacobian."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(5, track_running_stats=False)  # always the batch's statistics
    model = nn.Sequential(nn.Linear(3, 5), norm, nn.ReLU(), nn.Linear(5, 2))
    model = model.double().train()
    x = _inputs(30, 3, 7)
    fm = flat_model(model, x)
    assert _per_sample_jacobian(fm) is None
    assert torch.allclose(jacobian(model, x), torch.func.jacrev(fm.f)(fm.theta), atol=1e-13)


# -- orbit projector and preconditioner --------------------------------------------


def test_orbit_projector_is_orthogonal_and_counts_rank() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.zeros(5, 40, dtype=F64)
    t[:4, :12] = torch.randn(4, 12, generator=gen, dtype=F64)
    t[4] = t[0] + 2 * t[1]  # dependent: rank 4
    proj = Orbit(t)
    assert proj.rank == 4
    v = torch.randn(40, 3, generator=gen, dtype=F64)
    pv = proj(v)
    assert float((t @ pv).abs().max()) < 1e-13
    assert torch.allclose(proj(pv), pv, atol=1e-14)
    assert torch.linalg.matrix_rank(torch.cat([t, (v - pv).T])).item() == 4


def test_kfac_is_exact_for_one_linear_layer() -> None:
    """For `y = W x + b`, `JᵀJ = I ⊗ Σ [x;1][x;1]ᵀ`: K-FAC is exact up to the probes'
    sampling of the identity, so `M JᵀJ` is close to the identity (this checks the layout
    of weight and bias)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = _inputs(300, 4, 8)
    fm = flat_model(model, x)
    prec, kind = preconditioner(fm, gen=torch.Generator().manual_seed(1))
    assert kind == "K-FAC"
    jac = jacobian(model, x)
    m = torch.stack([prec(c) for c in torch.eye(fm.theta.numel(), dtype=F64)], 1)
    ev = torch.linalg.eigvals(m @ jac.T @ jac).real
    assert float(ev.min()) > 0.8 and float(ev.max()) < 1.25


def test_preconditioner_falls_back_to_the_diagonal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2)).double()
    fm = flat_model(model, _inputs(50, 3, 9))
    prec, kind = preconditioner(fm, gen=torch.Generator().manual_seed(0))
    assert kind == "K-FAC + Jacobi diagonal"
    v = torch.randn(fm.theta.numel(), generator=torch.Generator().manual_seed(2), dtype=F64)
    assert float(v @ prec(v)) > 0  # positive definite on a random vector


# -- matrix-free certificate -------------------------------------------------------


def _reference(model: nn.Module, x: torch.Tensor, group: gaugenet.GaugeGroup) -> float:
    """Smallest singular value of J on the complement of the orbit, by dense SVD."""
    t = group.tangent(model)
    q, _ = torch.linalg.qr(t.T, mode="complete")
    return float(torch.linalg.svdvals(jacobian(model, x) @ q[:, t.shape[0] :])[-1])


@pytest.fixture(scope="module")
def mlp_case() -> tuple[nn.Module, torch.Tensor, gaugenet.GaugeGroup]:
    model, x = _balanced_mlp((6, 24, 16, 4), 11), _inputs(300, 6, 12)
    return model, x, gaugenet.symmetries(model, x)


def test_matrix_free_agrees_with_svd_and_exact(mlp_case) -> None:
    model, x, group = mlp_case
    res = matrix_free_certificate(model, x, group)
    ref = _reference(model, x, group)
    assert res.converged and res.residual <= res.tol * res.sigma_min**2
    assert res.sigma_min == pytest.approx(ref, rel=1e-3)
    assert res.sigma_min >= ref * (1 - 1e-10)  # a Ritz value bounds from above
    assert res.orbit_rank == group.dim and res.preconditioner == "K-FAC"
    exact = gaugenet.certify(model, x, group=group, method="exact")
    mf = gaugenet.certify(model, x, group=group, method="matrix-free")
    assert mf.unexplained == exact.unexplained == 0
    assert mf.converged and mf.verdict == "right" and exact.verdict == "complete"
    assert mf.functional_dimension == exact.functional_dimension


def test_matrix_free_without_symmetries_finds_the_kernel(mlp_case) -> None:
    """Negative: with no symmetries projected out, the orbit directions are in the kernel;
    sigma_min is numerically zero (certainly: a Ritz value is an upper bound)."""
    model, x, group = mlp_case
    empty = gaugenet.GaugeGroup((), (), group.param_names)
    res = matrix_free_certificate(model, x, empty)
    assert res.converged and res.orbit_rank == 0
    assert res.sigma_min < 1e-6 * res.sigma_max
    report = gaugenet.certify(model, x, group=empty, method="matrix-free")
    assert report.unexplained > 0 and not report.ok


def test_matrix_free_missing_factor_is_unexplained(mlp_case) -> None:
    model, x, group = mlp_case
    partial = gaugenet.GaugeGroup(group.factors[1:], group.breakers, group.param_names)
    report = gaugenet.certify(model, x, group=partial, method="matrix-free")
    assert report.converged and report.unexplained >= 1


def test_matrix_free_budget_too_small_is_not_converged(mlp_case) -> None:
    model, x, group = mlp_case
    res = matrix_free_certificate(model, x, group, max_iter=5)
    assert not res.converged and res.iterations <= 5
    assert res.residual > res.tol * res.sigma_min**2
    report = gaugenet.certify(model, x, group=group, method="matrix-free", max_iter=5)
    assert not report.ok and any("did not converge" in line for line in report.lines())


def test_preconditioner_is_what_makes_it_converge(mlp_case) -> None:
    """Negative: the same budget without the preconditioner does not converge."""
    model, x, group = mlp_case
    res = matrix_free_certificate(model, x, group)
    plain = matrix_free_certificate(model, x, group, max_iter=res.iterations, precondition=False)
    assert plain.preconditioner == "none" and not plain.converged


def test_tighter_tol_is_more_accurate(mlp_case) -> None:
    model, x, group = mlp_case
    ref = _reference(model, x, group)
    loose = matrix_free_certificate(model, x, group, tol=0.3)
    tight = matrix_free_certificate(model, x, group, tol=1e-4)
    assert loose.converged and tight.converged and tight.iterations > loose.iterations
    assert abs(tight.sigma_min - ref) <= abs(loose.sigma_min - ref)
    assert tight.sigma_min == pytest.approx(ref, rel=1e-7)


def test_matrix_free_bad_input(mlp_case) -> None:
    model, x, group = mlp_case
    with pytest.raises(GaugeError, match="max_iter"):
        matrix_free_certificate(model, x, group, max_iter=0)
    with pytest.raises(GaugeError, match="tol"):
        matrix_free_certificate(model, x, group, tol=1.5)
    with pytest.raises(GaugeError, match="zero_tol"):
        matrix_free_certificate(model, x, group, zero_tol=0.0)
    other = _mlp((6, 5, 4), 0)  # the group of another model
    with pytest.raises(GaugeError, match="group"):
        matrix_free_certificate(other, x, group)


@pytest.mark.parametrize("name", ["resnet", "concat_cnn", "gcn", "prenorm"])
def test_matrix_free_on_other_architectures(name: str) -> None:
    """Convolutions, BatchNorm, graph layers, attention: parameters outside `nn.Linear`
    get the Jacobi diagonal; the certificate still converges and agrees."""
    from zoo import ZOO

    entry = next(e for e in ZOO if e.name == name)
    model, x = entry.build(), entry.inputs(torch.Generator().manual_seed(0))
    group = gaugenet.symmetries(model, x)
    res = matrix_free_certificate(model, x, group)
    assert res.converged and "Jacobi diagonal" in res.preconditioner
    assert res.sigma_min == pytest.approx(_reference(model, x, group), rel=1e-3)


class _Unused(nn.Module):
    """An MLP with a parameter its forward never reads: 3 hidden null directions."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _balanced_mlp((4, 10, 3), 21)
        self.spare = nn.Parameter(torch.ones(3, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_matrix_free_unused_parameter() -> None:
    """A parameter the forward never reads is a free factor of the discovered group (both
    methods then find nothing hidden). Negative: left out of the group, it is hidden
    redundancy; its zero curvature does not break the preconditioner (finite damping), and
    both methods report it."""
    model, x = _Unused(), _inputs(200, 4, 22)
    full = gaugenet.symmetries(model, x)
    (free,) = [f for f in full.factors if f.kind == "free"]
    assert free.dim == 3 and free.params() == ("spare",)
    assert gaugenet.certify(model, x, group=full, method="exact").unexplained == 0
    rest = tuple(f for f in full.factors if f is not free)
    group = gaugenet.GaugeGroup(rest, full.breakers, full.param_names)
    res = matrix_free_certificate(model, x, group)
    assert res.converged and res.sigma_min < 1e-6 * res.sigma_max
    assert all(math.isfinite(v) for v in (res.sigma_min, res.sigma_max, res.residual))
    assert gaugenet.certify(model, x, group=group, method="exact").unexplained == 3
    assert gaugenet.certify(model, x, group=group, method="matrix-free").unexplained >= 1
