"""Certification: the functional dimension against the discovered symmetries, on the zoo."""

from __future__ import annotations

import copy
import math

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
    assert report.verdict == "complete" and not report.wrong, report.lines()
    assert report.worst_residual < 1e-11  # every factor measured in ker J
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
    assert exact.ok and exact.verdict == "complete" and exact.exact
    # matrix-free gives a lower bound on the missing dimension (0 here): no proof of
    # completeness, so the verdict is "right", not "complete"
    assert mf.converged and not mf.exact and mf.verdict == "right" and not mf.ok
    # negative: three Lanczos steps do not converge, and the report says so
    short = gaugenet.certify(model, x, group=group, method="matrix-free", max_iter=3)
    assert not short.converged and not short.ok
    assert any("did not converge" in line for line in short.lines())
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


def test_tied_weights_joint_rescaling() -> None:
    """The tied zoo model keeps one joint rescaling, which discovery solves from the tie:
    `W ↦ cW, b1 ↦ c b1, b2 ↦ c² b2, out.weight ↦ out.weight / c²`. With it `certify` leaves
    nothing unexplained; without it the one direction shows up, with the tie as its cause."""
    entry = next(e for e in ZOO if e.name == "tied")
    model, x = entry.build(), entry.inputs(torch.Generator().manual_seed(0))
    group = gaugenet.symmetries(model, x)
    (joint,) = group.factors
    assert joint.dim == 1
    alpha = joint.scales(torch.tensor([math.log(1.7)], dtype=torch.float64))
    # the hidden scales of the two uses: c and c² (up to the basis' normalization)
    assert torch.allclose(alpha[4:], alpha[:4] ** 2) and torch.allclose(alpha[:4], alpha[0])
    assert gaugenet.certify(model, x, group=group).unexplained == 0
    moved = group.act(model, {joint.name: torch.tensor([0.8], dtype=torch.float64)})
    assert moved[0].l1.weight is moved[0].l2.weight  # still tied
    assert gaugenet.invariance_error(model, moved, x) < 1e-12
    empty = gaugenet.GaugeGroup((), group.breakers, group.param_names)
    report = gaugenet.certify(model, x, group=empty)
    assert report.unexplained == 1
    assert any("tied" in c for c in report.causes)
    t = model[0]

    def rescaled(c: float, power_b2: int) -> nn.Module:
        new = copy.deepcopy(model)
        n = new[0]
        with torch.no_grad():
            n.l1.weight.mul_(c)  # shared with l2
            n.l1.bias.mul_(c)
            n.l2.bias.mul_(c**power_b2)
            n.out.weight.div_(c**2)
        return new

    assert t.l1.weight is t.l2.weight
    assert gaugenet.invariance_error(model, rescaled(1.7, 2), x) < 1e-12
    # negative: the second bias scaled like the first breaks it
    assert gaugenet.invariance_error(model, rescaled(1.7, 1), x) > 1e-3


def _directions(model: nn.Module, pre_norm: bool) -> list[torch.Tensor]:
    """Exact kernel directions of the transformer zoo blocks derived by hand, independently
    of discovery (d = 4, 2 heads, hidden 5; LayerNorm `y = γ ⊙ n + β`, `n ⊥ 1`). Discovery
    finds all of them (this test checks that they and the discovered tangents span the same
    kernel of the Jacobian):

    - value bias: `b_v += u`, `b_o −= W_o u` (softmax rows sum to one), 4;
    - a LayerNorm feeding only a linear `W, b`: shift `β += u`, `b −= W u` (4) and the
      mean-subtraction kernel `W += a (1/γ)ᵀ`, `b −= a Σ β/γ` (one per output of the linear);
      pre-norm also the per-coordinate scale of `ln1` into `in_proj` (4);
    - anything along `1` added right before a LayerNorm: `W += 1 aᵀ`, `b += t 1`;
    - pre-norm: `b_o += t 1`, `fc2.bias −= t 1` (ln2 removes it, the residual output keeps it), 1;
    - post-norm: `ln1.bias += u` with `fc1.bias −= W₁ u`, `fc2.bias −= u`, 4.
    """
    P = {k: v.detach() for k, v in model.named_parameters()}
    sizes = {k: v.numel() for k, v in P.items()}
    keys = list(P)

    def vec(d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([d[k].reshape(-1) if k in d else torch.zeros(sizes[k]) for k in keys])

    z, e = torch.zeros_like, torch.eye(12, dtype=torch.float64)
    out = [
        vec({"attn.in_proj_bias": e[8 + j], "attn.out_proj.bias": -P["attn.out_proj.weight"][:, j]})
        for j in range(4)
    ]

    def into(ln: str, w: str, b: str, shift: bool, scale: bool) -> list[torch.Tensor]:
        g, beta, W = P[f"{ln}.weight"], P[f"{ln}.bias"], P[w]
        res = []
        for i in range(W.shape[0]):
            dw, db = z(W), z(P[b])
            dw[i], db[i] = 1 / g, -(beta / g).sum()
            res.append(vec({w: dw, b: db}))
        for j in range(4):
            if shift:
                res.append(vec({f"{ln}.bias": e[j, :4], b: -W[:, j]}))
            if scale:
                dw = z(W)
                dw[:, j] = -W[:, j]
                res.append(
                    vec({f"{ln}.weight": g * e[j, :4], f"{ln}.bias": beta * e[j, :4], w: dw})
                )
        return res

    def before(w: str, b: str) -> list[torch.Tensor]:
        res = []
        for j in range(P[w].shape[1]):
            dw = z(P[w])
            dw[:, j] = 1
            res.append(vec({w: dw}))
        return [*res, vec({b: torch.ones_like(P[b])})]

    one = torch.ones(4, dtype=torch.float64)
    if pre_norm:
        out += into("ln1", "attn.in_proj_weight", "attn.in_proj_bias", True, True)
        out += into("ln2", "fc1.weight", "fc1.bias", True, False)
        out.append(vec({"attn.out_proj.bias": one, "fc2.bias": -one}))
    else:
        out += before("attn.out_proj.weight", "attn.out_proj.bias") + before(
            "fc2.weight", "fc2.bias"
        )
        out += into("ln1", "fc1.weight", "fc1.bias", False, False)
        out += [
            vec({"ln1.bias": e[j, :4], "fc1.bias": -P["fc1.weight"][:, j], "fc2.bias": -e[j, :4]})
            for j in range(4)
        ]
    return out


@pytest.mark.parametrize(("name", "missing"), [("prenorm", 0), ("postnorm", 0)])
def test_transformer_blocks_redundancy_accounted(name: str, missing: int) -> None:
    """The transformer zoo blocks: what `certify` leaves unexplained is exactly spanned (with
    the discovered tangents) by the hand-derived directions of `_directions`."""
    from gaugenet.certify._functional_dimension import jacobian

    entry = next(e for e in ZOO if e.name == name)
    model, x = entry.build(), entry.inputs(torch.Generator().manual_seed(0))
    group = gaugenet.symmetries(model, x)
    assert gaugenet.certify(model, x, group=group).unexplained == missing
    extra = torch.stack(_directions(model, name == "prenorm"))
    jac = jacobian(model, x)
    assert float((jac @ extra.T).abs().max()) < 1e-12 * float(jac.abs().max())  # in the kernel
    s = torch.linalg.svdvals(jac)
    null = int((s <= 1e-9 * s[0]).sum()) + jac.shape[1] - len(s)
    both = torch.cat([group.tangent(model), extra])
    assert torch.linalg.matrix_rank(both).item() == null  # together they span it
    assert torch.linalg.matrix_rank(group.tangent(model)).item() == null - missing


def test_dead_unit_behind_a_functional_relu_is_named() -> None:
    """Forward hooks cannot see `F.relu`; the causes trace the model to find its inputs. A
    two-block stack whose feed-forward biases are left random has a dead unit in block 2."""
    from gaugenet.discovery._zoo import Stack

    torch.manual_seed(5)
    model = Stack(pre_norm=True).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(60, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    report = gaugenet.certify(model, x)
    assert report.unexplained > 0
    assert any("dead" in c and c.startswith("relu") for c in report.causes), report.causes


class _Twice(nn.Module):
    """One `nn.Linear` called twice (a weight-tied recurrence written as a loop), ReLU
    between, then a readout."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=bias)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


@pytest.mark.parametrize("bias", [False, True])
def test_module_called_twice_is_a_tie(bias: bool) -> None:
    """Two calls of one module are two uses of its parameters: the tie is solved like one
    between two names. Without biases `a ↦ c a`, `b.weight ↦ b.weight / c²` survives (the
    hidden scales of the calls are `c` and `c²`); the shared bias would need `c = c²`, so
    with it nothing does. `certify` finds the group complete in either case (seed 1: every
    ReLU unit is both on and off on these inputs)."""
    torch.manual_seed(1)
    model = _Twice(bias).double()
    x = torch.randn(200, 4, dtype=torch.float64)
    group = gaugenet.symmetries(model, x)
    assert group.dim == (0 if bias else 1)
    report = gaugenet.certify(model, x, group=group)
    assert report.verdict == "complete" and report.unexplained == 0
    if not bias:
        (joint,) = group.factors
        moved = group.act(model, {joint.name: torch.tensor([0.6], dtype=torch.float64)})
        assert gaugenet.invariance_error(model, moved, x) < 1e-12
        assert not torch.allclose(moved.a.weight, model.a.weight)
        # negative: the readout divided by c instead of c² changes the outputs
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            wrong.a.weight.mul_(1.5)
            wrong.b.weight.div_(1.5)
        assert gaugenet.invariance_error(model, wrong, x) > 1e-3


class _Keyword(nn.Module):
    """A model called with keyword inputs, returning a dict (as Hugging Face models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.b(torch.relu(self.a(x))) * gate, "steps": torch.ones(1).long()}


def test_certify_takes_keyword_inputs() -> None:
    """`certify` takes the dict of keyword inputs `symmetries` takes (the model seen as a
    function of their values in order, its floating outputs as a tuple)."""
    torch.manual_seed(0)
    model = _Keyword().double()
    x = torch.randn(200, 3, dtype=torch.float64)
    gate = torch.rand(200, 1, dtype=torch.float64) + 0.5
    report = gaugenet.certify(model, {"x": x, "gate": gate})
    assert report.verdict == "complete" and report.symmetry_dim == 5
    # the model itself is left as it was (the positional view is a copy)
    assert type(model) is _Keyword and model(x=x, gate=gate)["out"].shape == (200, 2)
