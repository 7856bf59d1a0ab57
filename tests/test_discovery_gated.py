"""Gated MLPs `down(act(gate(x)) * up(x))`: the product of two computed tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugenet
from gaugenet.groups import MonomialScaleFactor
from gaugenet.groups._monomial import canonical_monomial

F64 = torch.float64


class Gated(nn.Module):
    def __init__(self, act, d: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.act = act
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def _model(act) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(40, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    return Gated(act).to(F64), x


@pytest.mark.parametrize("act", [F.silu, F.gelu], ids=["SwiGLU", "GeGLU"])
def test_gated_mlp_rescales_the_linear_branch_completely(act) -> None:
    model, x = _model(act)
    group = gaugenet.symmetries(model, x)
    assert group.dim == 6  # one scale per hidden unit, on up's rows and down's columns
    moved = group.act(model, group.sample(torch.Generator().manual_seed(2)))
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete" and report.unexplained == 0
    # negative: the same scales on the gate's rows instead change the outputs
    wrong = Gated(act).to(F64)
    wrong.load_state_dict(model.state_dict())
    alpha = torch.exp(torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        wrong.gate.weight.mul_(alpha[:, None])
        wrong.down.weight.div_(alpha)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-2


def test_reglu_rescales_both_factors_of_the_product() -> None:
    """With ReLU both factors rescale: gate row `i` by `α_i`, up row `i` by `β_i`, and down's
    column `i` by `1/(α_i β_i)`: one exponent equation per hidden unit, solved exactly."""
    model, x = _model(F.relu)
    group = gaugenet.symmetries(model, x)
    assert group.dim == 12
    assert not any("product" in b.reason for b in group.breakers)
    assert [f.kind for f in group.factors if f.dim] == ["rescaling"]
    (f,) = [f for f in group.factors if f.dim]
    assert isinstance(f, MonomialScaleFactor)
    assert torch.equal(f.basis, f.basis.round())  # integer exponents
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        m, xs = model.to(dtype), x.to(dtype)
        g = group.sample(torch.Generator().manual_seed(2), dtype=dtype)
        assert gaugenet.invariance_error(m, group.act(m, g), xs) < tol
    model = model.to(F64)
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete" and report.unexplained == 0
    # the element composes and inverts
    g = group.sample(torch.Generator().manual_seed(4))
    back = group.act(group.act(model, g), group.inverse(g))
    assert gaugenet.invariance_error(model, back, x) < 1e-12
    assert (
        max((back.state_dict()[k] - v).abs().max() for k, v in model.state_dict().items()) < 1e-12
    )


def test_reglu_wrong_exponents_change_the_outputs() -> None:
    """Negative: down's columns taking back only the gate's scale (not the product's)."""
    model, x = _model(F.relu)
    wrong = Gated(F.relu).to(F64)
    wrong.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(3)
    alpha, beta = (torch.exp(torch.randn(6, dtype=F64, generator=gen)) for _ in range(2))
    with torch.no_grad():
        wrong.gate.weight.mul_(alpha[:, None])
        wrong.up.weight.mul_(beta[:, None])
        wrong.down.weight.div_(alpha)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-2
    with torch.no_grad():
        wrong.down.weight.div_(beta)  # the right exponents: 1/(α β)
    assert gaugenet.invariance_error(model, wrong, x) < 1e-12


def test_reglu_canonical_form_balances_the_scaled_norms() -> None:
    """The canonical element minimizes the squared norm of the scaled parameters: at the
    canonical point no element of the factor lowers it (first order: gradient zero)."""
    model, x = _model(F.relu)
    group = gaugenet.symmetries(model, x)
    canon = gaugenet.canonicalize(model, group=group)
    assert gaugenet.invariance_error(model, canon, x) < 1e-10
    (f,) = [f for f in group.factors if f.dim]
    state = {k: v.detach() for k, v in canon.named_parameters()}
    z = canonical_monomial(f, state)
    assert float(z.abs().max()) < 1e-6


def test_reglu_align_and_equalize_accept_the_exponent_factor() -> None:
    """`align` recovers an element moving one ReGLU onto another (through the canonical
    form of the `MonomialScaleFactor`); `equalize` runs on the group and keeps the
    function."""
    from gaugenet.apply import equalize

    model, x = _model(F.relu)
    group = gaugenet.symmetries(model, x)
    g = group.sample(torch.Generator().manual_seed(5))
    moved = group.act(model, g)
    found = gaugenet.align(model, moved, group=group)
    recovered = group.act(model, found)
    for k, v in moved.state_dict().items():
        assert torch.allclose(recovered.state_dict()[k], v, rtol=1e-9, atol=1e-12)
    eq = equalize(model, x, bits=4, group=group, search=0)
    assert gaugenet.invariance_error(model, eq, x) < 1e-9


def test_reglu_noether_charges_are_conserved() -> None:
    """The charge of each direction of the exponent factor is orthogonal to the loss
    gradient (conserved under gradient flow); a charge of the wrong sign is not."""
    from gaugenet.dynamics import noether_charges

    model, x = _model(F.relu)
    group = gaugenet.symmetries(model, x)
    (f,) = [f for f in group.factors if f.dim]
    y = torch.randn(40, 4, dtype=F64, generator=torch.Generator().manual_seed(9))
    params = dict(model.named_parameters())
    loss = ((model(x) - y) ** 2).mean()
    grad = torch.autograd.grad(loss, list(params.values()))
    q = noether_charges(model, group)[f.name]
    assert q.shape == (12,)
    for j in range(12):
        dq = torch.autograd.grad(q[j], list(params.values()), retain_graph=True)
        dot = sum((a * b).sum() for a, b in zip(dq, grad))
        scale = sum(a.norm() for a in dq) * sum(b.norm() for b in grad)
        assert abs(float(dot)) < 1e-12 * float(scale)
    # negative: the gate rows' norm alone is not conserved
    w = params["gate.weight"]
    dg = torch.autograd.grad((w[0] ** 2).sum(), w)[0]
    assert abs(float((dg * grad[list(params).index("gate.weight")]).sum())) > 1e-6


@pytest.mark.parametrize("act", [F.silu, F.gelu], ids=["SwiGLU", "GeGLU"])
def test_gated_mlp_permutes_its_hidden_units(act) -> None:
    """The hidden units of a gated MLP can be permuted: gate and up rows and down columns
    together. The gate's scales are fixed by the nonlinearity and the up branch's are free;
    the permutation conjugates the up rescaling. A permutation of the gate rows alone (up
    and down left in place) changes the outputs."""
    model, x = _model(act)
    group = gaugenet.symmetries(model, x)
    (perm,) = [f for f in group.factors if f.kind == "permutation"]
    order = torch.tensor([3, 1, 0, 5, 4, 2])
    moved = group.act(model, {perm.name: order})
    assert torch.equal(moved.gate.weight, model.gate.weight[order])
    assert torch.equal(moved.down.weight, model.down.weight[:, order])
    assert gaugenet.invariance_error(model, moved, x) < 1e-13
    # composed with the rescaling, both orders of the two factors agree
    g = group.sample(torch.Generator().manual_seed(3))
    g[perm.name] = order
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-12
    wrong = Gated(act).to(F64)
    wrong.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong.gate.weight.copy_(model.gate.weight[order])
    assert gaugenet.invariance_error(model, wrong, x) > 1e-2


def test_reglu_permutation_conjugates_the_exponent_factor() -> None:
    """ReGLU's hidden units permute too, beside its exponent factor: the permutation
    re-indexes the entries of `z` each unit owns (the up rows' and the product's), so
    composing and inverting elements that mix both stay exact."""
    model, x = _model(F.relu)
    group = gaugenet.symmetries(model, x)
    (perm,) = [f for f in group.factors if f.kind == "permutation"]
    (mono,) = [f for f in group.factors if isinstance(f, MonomialScaleFactor)]
    assert {name for name, _ in perm.conjugates} == {mono.name}
    assert len(perm.conjugates) == 2  # two entries of z per hidden unit
    gen = torch.Generator().manual_seed(4)
    g, h = group.sample(gen), group.sample(gen)
    g[perm.name], h[perm.name] = torch.tensor([3, 1, 0, 5, 4, 2]), torch.tensor([1, 2, 0, 4, 5, 3])
    both = group.act(group.act(model, g), h)
    assert gaugenet.invariance_error(model, both, x) < 1e-12
    composed = group.act(model, group.compose(g, h))
    for (name, a), b in zip(both.named_parameters(), composed.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name
    back = group.act(group.act(model, g), group.inverse(g))
    for a, b in zip(back.parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    # negative: the exponent element left un-permuted (conjugation skipped) is not g∘h
    naive = group.act(model, {**group.compose(g, h), mono.name: g[mono.name] + h[mono.name]})
    assert max((a - b).abs().max() for a, b in zip(naive.parameters(), both.parameters())) > 1e-3
