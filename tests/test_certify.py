"""Certification: the functional dimension against the discovered symmetries, on the zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gaugenet
from gaugenet import GaugeError
from gaugenet.certify import matrix_free_certificate
from zoo import ZOO

_KNOWN = [e for e in ZOO if e.known]


@pytest.mark.parametrize("entry", _KNOWN, ids=[e.name for e in _KNOWN])
def test_zoo_unexplained_zero(entry) -> None:
    model, x = entry.build(), entry.inputs(torch.Generator().manual_seed(0))
    group = gaugenet.symmetries(model, x)
    report = gaugenet.certify(model, x, group=group)
    assert report.unexplained == 0, report.lines()
    assert report.gap > 1e6  # the rank does not hinge on the tolerance
    assert group.dim == entry.dim  # the count derived by hand in tests/zoo.py
    names = " ".join(str(b) for b in group.breakers).lower()
    for word in entry.breakers:
        assert word.lower() in names


def test_too_few_inputs_refused(gen) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    with pytest.raises(GaugeError, match="more inputs"):
        gaugenet.functional_dimension(model, torch.randn(5, 4, generator=gen, dtype=torch.float64))


def test_dead_unit_is_hidden_redundancy(gen) -> None:
    """A unit dead on every input makes its incoming weights redundant: reported, with cause."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        model[0].bias[2] = -100.0
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    report = gaugenet.certify(model, x)
    assert report.unexplained >= 4  # 3 weights and the bias of the dead unit, at least
    assert any("dead" in c for c in report.causes)


def test_missing_symmetry_shows_up(gen) -> None:
    """Negative test: dropping a factor makes `unexplained` positive by its dimension."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    group = gaugenet.symmetries(model, x)
    partial = gaugenet.GaugeGroup(
        tuple(f for f in group.factors if f.kind != "rescaling"), group.breakers, group.param_names
    )
    assert gaugenet.certify(model, x, group=partial).unexplained == 6


def test_matrix_free_agrees_with_exact(gen) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    group = gaugenet.symmetries(model, x)
    exact = gaugenet.certify(model, x, group=group, method="exact")
    mf = gaugenet.certify(model, x, group=group, method="matrix-free")
    assert exact.unexplained == mf.unexplained == 0
    # reference: the smallest singular value of J on the complement of the orbit
    from gaugenet.certify._functional_dimension import jacobian

    jac = jacobian(model, x)
    t = group.tangent(model)
    q, _ = torch.linalg.qr(t.T, mode="complete")
    ref = torch.linalg.svdvals(jac @ q[:, t.shape[0] :])[-1]
    assert mf.sigma_min == pytest.approx(float(ref), rel=1e-4)
    # negative: without the symmetries the smallest singular value is zero
    empty = gaugenet.GaugeGroup((), (), group.param_names)
    res = matrix_free_certificate(model, x, empty)
    assert res.sigma_min < 1e-6 * res.sigma_max
