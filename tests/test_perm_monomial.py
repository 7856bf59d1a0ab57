"""A permutation of units beside an exponent factor (`discovery/_perm_monomial.py`): the
entries of `z` each unit owns come from the factor's basis, so the permutation is kept and
composes with the factor. Models: `lin2(w ⊙ relu(lin1 x))` (a gain vector read elementwise,
two entries of `z` per unit, one of them owned by no tensor a link records) and a squared
ReLU MLP (`lin2(relu(lin1 x)²)`, Nemotron's)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._perm_monomial import monomial_conjugates
from gaugenet.groups import MonomialScaleFactor, PermTerm, PermutationFactor, Scale

F64 = torch.float64
H = 5
#: float64 round-off of a few products and sums of order-one numbers, with margin
TOL = 1e-12


class Gained(nn.Module):
    """`lin2(w ⊙ relu(lin1 x))`, `w` a parameter vector multiplied elementwise."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, H), nn.Linear(H, 2)
        self.w = nn.Parameter(torch.rand(H) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.w * torch.relu(self.lin1(x)))


class Squared(nn.Module):
    """`lin2(relu(lin1 x)²)`: each hidden unit scales by `α²`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, H), nn.Linear(H, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.square(torch.relu(self.lin1(x))))


def _setup(cls: type[nn.Module]) -> tuple[nn.Module, torch.Tensor, gaugenet.GaugeGroup]:
    torch.manual_seed(0)
    model = cls().to(F64)
    x = torch.randn(200, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # every unit active on some inputs and not on others
        model.lin1.bias.mul_(0.1)
    return model, x, gaugenet.symmetries(model, x)


def _param_gap(a: nn.Module, b: nn.Module) -> float:
    """The largest difference of two models' parameters (output checks cannot tell two
    points of one orbit apart)."""
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def _perm(group: gaugenet.GaugeGroup) -> PermutationFactor:
    (p,) = [f for f in group.factors if isinstance(f, PermutationFactor)]
    return p


@pytest.mark.parametrize(("cls", "dim"), [(Gained, 2 * H), (Squared, H)], ids=["gain", "square"])
def test_permutation_is_kept_beside_the_exponent_factor(cls: type[nn.Module], dim: int) -> None:
    model, x, group = _setup(cls)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    (mono,) = [f for f in group.factors if isinstance(f, MonomialScaleFactor)]
    assert mono.dim == dim == group.dim
    perm = _perm(group)
    assert perm.n == H
    # every entry of `z` is owned by one unit: the permutation moves all of them
    owned = torch.cat([m for name, m in perm.conjugates if name == mono.name])
    assert sorted(owned.tolist()) == list(range(dim))
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete" and report.unexplained == 0
    assert report.worst_residual < 1e-12  # the orbit tangents lie in ker J


@pytest.mark.parametrize("cls", [Gained, Squared], ids=["gain", "square"])
def test_group_laws_with_permutations(cls: type[nn.Module]) -> None:
    model, x, group = _setup(cls)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        g, h = group.sample(gen), group.sample(gen)
        moved = group.act(model, g)
        assert gaugenet.invariance_error(model, moved, x) < TOL
        both = group.act(model, group.compose(g, h))
        assert _param_gap(group.act(moved, h), both) < TOL
        assert _param_gap(group.act(moved, group.inverse(g)), model) < TOL


def test_old_declaration_breaks_the_composition() -> None:
    """Negative: a permutation that re-indexes only the entries of `z` owned by `w` (what
    a link on `w` alone declared before) does not compose with the exponent factor:
    `act(act(m, g), h)` and `act(m, compose(g, h))` differ."""
    model, x, group = _setup(Gained)
    perm = _perm(group)
    (mono,) = [f for f in group.factors if isinstance(f, MonomialScaleFactor)]
    w_cols = (mono.basis[[mono.labels.index(f"w[{c}]") for c in range(H)]] != 0).float()
    only_w = w_cols.argmax(1)  # the entry of `z` each unit's `w` class reads
    half = PermutationFactor(
        perm.name,
        perm.n,
        terms=perm.terms,
        conjugates=((mono.name, only_w),),
        modules=perm.modules,
    )
    bad = gaugenet.GaugeGroup(
        tuple(half if f is perm else f for f in group.factors), (), group.param_names
    )
    gen = torch.Generator().manual_seed(3)
    g, h = bad.sample(gen), bad.sample(gen)
    g[perm.name] = torch.roll(torch.arange(H), 1)  # a permutation moving every unit
    both = bad.act(model, bad.compose(g, h))
    assert _param_gap(bad.act(bad.act(model, g), h), both) > 1e-3
    # the factors found compose
    both = group.act(model, group.compose(g, h))
    assert _param_gap(group.act(group.act(model, g), h), both) < TOL


def _factor(basis: list[list[float]]) -> MonomialScaleFactor:
    """Two units, one class each in `a` (rows 0, 1), basis columns as given."""
    B = torch.tensor(basis, dtype=F64)
    index = torch.tensor([[0], [1]])
    return MonomialScaleFactor("m", basis=B, terms=(Scale("a", index, 1),))


def test_conjugates_from_the_basis() -> None:
    terms = (PermTerm("a", 0, torch.tensor([[0], [1]])),)
    shapes = {"a": torch.Size([2, 3])}
    # each unit its own column: unit c owns entry c
    got = monomial_conjugates(terms, 2, _factor([[1.0, 0.0], [0.0, 1.0]]), shapes)
    assert got is not None and [m.tolist() for _, m in got] == [[0, 1]]
    # columns listed the other way round: unit 0 owns entry 1
    got = monomial_conjugates(terms, 2, _factor([[0.0, 1.0], [1.0, 0.0]]), shapes)
    assert got is not None and [m.tolist() for _, m in got] == [[1, 0]]
    # one column both units read alike (one scale for all): fixed, nothing re-indexed
    assert monomial_conjugates(terms, 2, _factor([[1.0], [1.0]]), shapes) == []


@pytest.mark.parametrize(
    "basis",
    [
        [[1.0, 0.0], [0.0, 2.0]],  # the units' exponents differ: swapping them is no symmetry
        [[1.0, 1.0], [0.0, 1.0]],  # a column of unit 0 that unit 1 reads too
    ],
    ids=["unequal", "uneven"],
)
def test_conjugates_refused_where_the_units_differ(basis: list[list[float]]) -> None:
    """Negative: where permuting the rows of `B` is no permutation of its columns that
    units own, no conjugation is declared (the permutation is then dropped)."""
    terms = (PermTerm("a", 0, torch.tensor([[0], [1]])),)
    got = monomial_conjugates(terms, 2, _factor(basis), {"a": torch.Size([2, 3])})
    assert got is None
