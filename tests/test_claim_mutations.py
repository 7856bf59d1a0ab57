"""Mutation tests: a bug planted in the library's mathematics makes the claim that guards it
fail. Each test monkeypatches one bug and runs the claim through the registry (quick size)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import gaugenet
import gaugenet._canonical
import gaugenet.ode._gauge_paths
from gaugenet.ode import AbstractDiffeo, SpatialDiffeo
from gaugenet.ode._diffeo_tools import spacetime_jacobian
from gaugenet.ode._linear_node import _Gauged
from gaugenet.reproduce import Context, all_claims


def _measure(claim_id: str, tmp_path) -> tuple[bool, float, str]:
    claim = {c.id: c for c in all_claims()}[claim_id]
    try:
        m = claim.fn(Context(out_dir=tmp_path, quick=True))
    except Exception as err:  # a crashing claim is a failed claim, as in run_claims
        return False, math.nan, repr(err)
    return claim.passed(float(m.value)), float(m.value), m.detail


def _fails(claim_id: str, tmp_path) -> None:
    passed, value, detail = _measure(claim_id, tmp_path)
    assert not passed, f"{claim_id} passed under the mutation: {value} ({detail})"


def test_time_reparametrization_direction(monkeypatch, tmp_path):
    # the node realizes t ↦ 2t − τ(t) instead of τ(t): first order off by the sign of ε
    orig = gaugenet.ode._gauge_paths.time_reparametrization

    def mutated(node, tau, tau_dot=None):
        return orig(node, lambda t: 2 * t - tau(t))

    monkeypatch.setattr(gaugenet.ode._gauge_paths, "time_reparametrization", mutated)
    _fails("linear_ode.eq27-time-reparametrization", tmp_path)


def test_canonicalize_returning_its_input(monkeypatch, tmp_path):
    monkeypatch.setattr(
        gaugenet._canonical, "canonicalize", lambda model, *a, **k: copy.deepcopy(model)
    )
    _fails("ff.canonical-align", tmp_path)


def test_footnote12_covariant_derivative_replaced_by_b(monkeypatch, tmp_path):
    from gaugenet.ode._regularizers import _grid

    def mutated(node, lam=1.0, *, order=24):
        t, wq = _grid(node, order)
        return lam * (wq * (node.b(t) ** 2).sum(-1)).sum()  # D_t b := b

    monkeypatch.setattr(gaugenet.ode, "covariant_higgs_kinetic", mutated)
    _fails("reg.footnote12-rotation", tmp_path)


def test_sign_of_the_inhomogeneous_term(monkeypatch, tmp_path):
    # w' = G⁻¹ w G + G⁻¹ Ġ instead of − G⁻¹ Ġ
    def mutated(self, t):
        d = self.base.d
        Gt, Gd, ct, cd = self.G(t), self.G.dot(t), self.c(t), self.c.dot(t)
        wt, bt = self.base.w(t), self.base.b(t)
        top = torch.cat([wt @ Gt + Gd, wt @ ct[..., None] + bt[..., None] - cd[..., None]], -1)
        new = torch.linalg.solve(Gt, top)
        return torch.cat([new, torch.zeros(t.shape[0], 1, d + 1, dtype=new.dtype)], dim=-2)

    monkeypatch.setattr(_Gauged, "forward", mutated)
    _fails("linear_ode.gauge-invariance", tmp_path)


def test_wilson_line_order_reversed(monkeypatch, tmp_path):
    import gaugenet.reproduce.claims.linear_ode as claims

    orig = claims.wilson_line

    def anti_ordered(w, t1, t0, **kwargs):  # T̄ exp instead of T exp: (T exp ∫ wᵀ)ᵀ
        return orig(lambda t: w(t).transpose(-1, -2), t1, t0, **kwargs).transpose(-1, -2)

    monkeypatch.setattr(claims, "wilson_line", anti_ordered)
    _fails("linear_ode.wilson-line-group-laws", tmp_path)


def test_pullback_without_inverse_jacobian(monkeypatch, tmp_path):
    def mutated(self, field, t, x):
        y, dy_dt, _ = spacetime_jacobian(self.forward, t, x)
        return field(t, y) - dy_dt  # Dφ⁻¹ dropped

    monkeypatch.setattr(SpatialDiffeo, "_pull", mutated)
    _fails("ode.lie-derivative-order", tmp_path)


def test_noop_pullback(monkeypatch, tmp_path):
    monkeypatch.setattr(AbstractDiffeo, "pullback_field", lambda self, field: field)
    _fails("ode.figures", tmp_path)


@pytest.mark.parametrize(
    "claim_id",
    ["linear_ode.eq27-time-reparametrization", "ff.canonical-align", "reg.footnote12-rotation"],
)
def test_unmutated_claims_pass(claim_id, tmp_path):
    passed, value, detail = _measure(claim_id, tmp_path)
    assert passed, f"{claim_id}: {value} ({detail})"


def test_layernorm_offset_not_offered(monkeypatch, tmp_path):
    # the offset group never offered (every Σβ/γ taken for negligible): d directions missing
    import gaugenet.discovery._offset

    monkeypatch.setattr(gaugenet.discovery._offset, "SUM_RATIO", 10.0)
    _fails("disc.layernorm-offset", tmp_path)


def test_qk_gains_not_offered(monkeypatch, tmp_path):
    # the gains after a query or key normalization taken for a parameter the pattern stops
    # at (as before they were traced): the attention core is refused whole
    import gaugenet.discovery._attention_trace

    monkeypatch.setattr(gaugenet.discovery._attention_trace, "as_gain", lambda *a: None)
    _fails("disc.qk-norm-gains", tmp_path)
