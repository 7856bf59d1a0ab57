"""Rescalings of products and powers: the exponent equations and their exact solve
(`discovery/_monomials.py`, `groups/_monomial.py`). The single-rule examples (ReGLU, `h * h`,
`sqrt(h * h)`, RMSNorm written out without `ε`) are checked in `test_rules.py`; here: the
solver, ties joined with products, RMSNorm with `ε` unchanged, and `n − rank J`."""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

import gaugenet
from gaugenet.certify import functional_dimension
from gaugenet.discovery._monomials import null_space
from gaugenet.groups import MonomialScaleFactor

F64 = torch.float64


def test_null_space_is_exact_and_integer() -> None:
    """`u₃ = u₁ + u₂`, `u₄ = −u₃ / 2`, `u₅ = 2 u₁`: a basis of two integer vectors."""
    half = Fraction(1, 2)
    rows = [
        {3: Fraction(1), 1: Fraction(-1), 2: Fraction(-1)},
        {4: Fraction(1), 3: half},
        {5: Fraction(1), 1: Fraction(-2)},
        {5: Fraction(2), 1: Fraction(-4)},  # dependent: no new constraint
    ]
    basis = null_space(rows, [1, 2, 3, 4, 5])
    assert len(basis) == 2
    for vec in basis:
        assert all(e.denominator == 1 for e in vec.values())
        for row in rows:
            assert sum(e * vec.get(c, 0) for c, e in row.items()) == 0
    B = torch.tensor([[float(v.get(c, 0)) for v in basis] for c in range(1, 6)], dtype=F64)
    assert int(torch.linalg.matrix_rank(B)) == 2


def test_null_space_of_an_independent_system_is_empty() -> None:
    rows = [{1: Fraction(1), 2: Fraction(-1)}, {1: Fraction(1), 2: Fraction(1)}]
    assert null_space(rows, [1, 2]) == []


class TiedGate(nn.Module):
    """ReGLU whose gate and up projections share one weight: `relu(h) ⊙ h`, `h = x Wᵀ`."""

    def __init__(self) -> None:
        super().__init__()
        self.g, self.u = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
        self.u.weight = self.g.weight
        self.down = nn.Linear(6, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.g(x)) * self.u(x))


class TiedProduct(nn.Module):
    """A weight read by two layers, the second reading a product of two rescaled tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a2 = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.a2.weight = self.a.weight
        self.b, self.out = nn.Linear(4, 4, bias=False), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, u = self.a(x), torch.relu(self.b(x))
        return self.out(torch.relu(self.a2(h * u)))


class RMSGated(nn.Module):
    """RMSNorm written out with `ε` (`x * rsqrt(mean(x²) + ε) * γ`) and a leaky ReLU (no rotation
    of the stream survives it) before a ReGLU."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 5)
        self.g = nn.Parameter(torch.rand(5) + 0.5)
        self.gate, self.up = nn.Linear(5, 6, bias=False), nn.Linear(5, 6, bias=False)
        self.down = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = F.leaky_relu(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.g, 0.2)
        return self.down(torch.relu(self.gate(h)) * self.up(h))


def _complete(model: nn.Module, x: torch.Tensor, dim: int) -> gaugenet.GaugeGroup:
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith("internal error")]
    assert group.dim == dim
    fd = functional_dimension(model, (x,))
    assert fd.n_params - fd.rank == dim
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete" and report.unexplained == 0
    for seed in range(3):
        g = group.sample(torch.Generator().manual_seed(seed))
        assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-12
    return group


def _inputs(d: int) -> torch.Tensor:
    return torch.randn(100, d, dtype=F64, generator=torch.Generator().manual_seed(1))


def test_tied_gate_solves_the_tie_with_the_product() -> None:
    """`h` row `i` scales by `α_i` in both uses; the product by `α_i²`: 6."""
    torch.manual_seed(0)
    model = TiedGate().to(F64)
    group = _complete(model, _inputs(4), 6)
    assert all(isinstance(f, MonomialScaleFactor) for f in group.factors if f.dim)


def test_tie_and_product_in_one_system() -> None:
    """`W` entry `(i, j)` scales by `α_i` (first use) and by `δ_i / π_j` (second use, `π`
    the product's scales): `π` is one common scale, `δ = α π`; `β_j = π / α_j` for the
    other factor: 4 + 1."""
    torch.manual_seed(0)
    _complete(TiedProduct().to(F64), _inputs(4), 5)


def test_rmsnorm_with_eps_before_a_reglu() -> None:
    """The normalized stream is fixed by `ε`; γ scales against both readers' columns (5);
    gate and up rows each scale, down's columns take the product (6 + 6)."""
    torch.manual_seed(0)
    model = RMSGated().to(F64)
    x = _inputs(8)
    group = _complete(model, x, 17)
    # float32: the same element within float32's tolerance
    m32 = RMSGated()
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    g = group.sample(torch.Generator().manual_seed(7), dtype=torch.float32)
    assert gaugenet.invariance_error(m32, group.act(m32, g), x.float()) < 1e-4


def test_wrong_power_changes_the_outputs() -> None:
    """Negative: in `out(h * h)` the reading column must take `α⁻²`; `α⁻¹` is off."""

    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.out = nn.Linear(6, 3), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.out(h * h)

    torch.manual_seed(0)
    model, x = Square().to(F64), _inputs(6)
    _complete(model, x, 3)
    alpha = torch.tensor([0.5, 2.0, 3.0], dtype=F64)
    wrong = Square().to(F64)
    wrong.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong.a.weight.mul_(alpha[:, None])
        wrong.a.bias.mul_(alpha)
        wrong.out.weight.div_(alpha)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-2
    with torch.no_grad():
        wrong.out.weight.div_(alpha)
    assert gaugenet.invariance_error(model, wrong, x) < 1e-12


class NormedReGLU(nn.Module):
    """LayerNorm read by a ReGLU: the LayerNorm kernel moves the gate's and up's rows,
    which the product's exponent factor rescales."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.ln = nn.Linear(6, 5), nn.LayerNorm(5)
        self.gate, self.up, self.down = nn.Linear(5, 7), nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.inp(x))
        return self.down(torch.relu(self.gate(h)) * self.up(h))


def test_layernorm_kernel_declares_the_exponent_factor() -> None:
    """The kernel (a translation of the readers' weights along `1`) does not commute with
    the rescaling of their rows: it declares the `MonomialScaleFactor` in `scaled_by`, so
    that `compose` and `inverse` are exact."""
    torch.manual_seed(0)
    model, x = NormedReGLU().to(F64), _inputs(6)
    group = gaugenet.symmetries(model, x)
    assert not [b for b in group.breakers if b.reason.startswith("internal error")]
    (mono,) = [f for f in group.factors if isinstance(f, MonomialScaleFactor)]
    kernels = [f for f in group.factors if f.name.startswith("ln_kernel")]
    assert kernels and all(mono.name in [c[0] for c in k.scaled_by] for k in kernels)
    a, b = (group.sample(torch.Generator().manual_seed(s)) for s in (1, 2))
    twice = group.act(group.act(model, a), b)
    once = group.act(model, group.compose(a, b))
    back = group.act(group.act(model, a), group.inverse(a))
    for k, v in model.state_dict().items():
        assert torch.allclose(twice.state_dict()[k], once.state_dict()[k], atol=1e-12, rtol=0)
        assert torch.allclose(back.state_dict()[k], v, atol=1e-12, rtol=0)
    assert gaugenet.invariance_error(model, twice, x) < 1e-12


def test_rounding_division_is_not_homogeneous() -> None:
    """`floor(h / 0.5)` does not commute with scaling `h`: its scales are fixed (no factor
    for the self-check to drop)."""

    class Floor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.div(torch.relu(self.a(x)), 0.5, rounding_mode="floor"))

    torch.manual_seed(0)
    group = gaugenet.symmetries(Floor().to(F64), _inputs(3))
    assert not [b for b in group.breakers if b.reason.startswith("internal error")]
    assert any("rounds" in b.reason for b in group.breakers)
    assert not [f for f in group.factors if f.dim and "a" in f.modules]
