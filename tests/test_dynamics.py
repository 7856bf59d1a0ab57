"""Noether charges, orthogonality of gradients to orbits, and teleportation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugenet
from gaugenet.dynamics import NoetherRecorder, Teleporting, noether_charges, orthogonality, teleport
from gaugenet.groups import GaugeGroup, GLFactor, MatTerm


def _mlp(gen: torch.Generator) -> nn.Sequential:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()


def _data(gen: torch.Generator, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 5, dtype=torch.float64, generator=gen), torch.randint(
        0, 3, (n,), generator=gen
    )


def _gd(model: nn.Module, x, y, lr: float, steps: int, wd: float = 0.0, rec=None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if rec is not None:
            rec(model)


def test_rescaling_charge_is_per_unit_norm_difference(gen):
    m = _mlp(gen)
    group = gaugenet.symmetries(m, torch.zeros(2, 5, dtype=torch.float64))
    q = noether_charges(m, group)["scale:0"]
    want = (m[0].weight ** 2).sum(1) + m[0].bias ** 2 - (m[2].weight ** 2).sum(0)
    torch.testing.assert_close(q, want, rtol=1e-14, atol=1e-14)


def test_charges_drift_linearly_with_step_and_decay_with_weight_decay(gen):
    m0 = _mlp(gen)
    x, y = _data(gen)
    group = gaugenet.symmetries(m0, x[:2])
    q0 = noether_charges(m0, group)
    drifts = []
    for lr in (1e-2, 1e-3):
        m = _mlp(torch.Generator().manual_seed(0))
        m.load_state_dict(m0.state_dict())
        _gd(m, x, y, lr, round(0.5 / lr))
        q = noether_charges(m, group)
        drifts.append(max(float((q[k] - q0[k]).detach().abs().max()) for k in q))
    assert 7 < drifts[0] / drifts[1] < 13  # drift ∝ η at fixed time t = η · steps
    # weight decay: Q(t) ≈ exp(−2λt) Q(0); λ = 0.5 and t = 1 give a factor e⁻¹
    m = _mlp(torch.Generator().manual_seed(0))
    m.load_state_dict(m0.state_dict())
    _gd(m, x, y, 1e-3, 1000, wd=0.5)
    ratio = noether_charges(m, group)["scale:0"] / q0["scale:0"]
    torch.testing.assert_close(ratio, torch.full_like(ratio, torch.e**-1.0), rtol=0.03, atol=0)
    # negative: without weight decay the charge keeps its value
    assert float(drifts[1] / q0["scale:0"].abs().max()) < 0.03


def test_gl_charge_conserved_for_a_linear_chain(gen):
    # y = W2 W1 x: W1 ↦ G⁻¹ W1, W2 ↦ W2 G; charge W2ᵀW2 − W1 W1ᵀ.
    m = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    f = GLFactor(
        "gl", d=3, b=1, terms=(MatTerm("0.weight", 0, 0, "inv"), MatTerm("1.weight", 1, 0, "T"))
    )
    group = GaugeGroup((f,), (), tuple(n for n, _ in m.named_parameters()))
    want = m[1].weight.T @ m[1].weight - m[0].weight @ m[0].weight.T
    q0 = noether_charges(m, group)["gl"]
    torch.testing.assert_close(q0[0], want, rtol=1e-14, atol=1e-14)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    drifts = []
    for lr in (1e-2, 1e-3):
        mm = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)).double()
        mm.load_state_dict(m.state_dict())
        opt = torch.optim.SGD(mm.parameters(), lr=lr)
        for _ in range(round(0.5 / lr)):
            opt.zero_grad()
            F.mse_loss(mm(x), y).backward()
            opt.step()
        drifts.append(float((noether_charges(mm, group)["gl"] - q0).abs().max()))
    assert 7 < drifts[0] / drifts[1] < 13
    # negative: the charge with the wrong sign (W W ᵀ of the reader) is not conserved
    wrong = mm[1].weight @ mm[1].weight.T
    assert float((wrong - m[1].weight @ m[1].weight.T).abs().max()) > 1e2 * drifts[1]


def test_recorder_tracks_history(gen):
    m = _mlp(gen)
    x, y = _data(gen)
    group = gaugenet.symmetries(m, x[:2])
    rec = NoetherRecorder(group)
    rec(m)
    _gd(m, x, y, 1e-3, 20, rec=rec)
    h = rec.history
    assert h["scale:0"].shape == (21, 7)
    assert max(rec.drift().values()) < 1e-4


def test_orthogonality_mlp_and_cnn(gen):
    m = _mlp(gen)
    x, y = _data(gen)
    group = gaugenet.symmetries(m, x[:2])
    cos = orthogonality(m, group, lambda mm: F.cross_entropy(mm(x), y))
    assert cos.shape == (group.dim,)
    assert float(cos.abs().max()) < 1e-10

    # negative: a loss with weight decay is not invariant, its gradient has orbit components
    def l2(mm):
        return F.cross_entropy(mm(x), y) + sum((p**2).sum() for p in mm.parameters())

    assert float(orthogonality(m, group, l2).abs().max()) > 1e-2
    cnn = (
        nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(12, 2),
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        cnn[1].running_mean.normal_(generator=gen)
        cnn[1].running_var.uniform_(0.5, 2.0, generator=gen)
    xi = torch.randn(6, 2, 6, 6, generator=gen, dtype=torch.float64)
    gc = gaugenet.symmetries(cnn, xi[:2])
    assert gc.dim > 0
    cos = orthogonality(cnn, gc, lambda mm: (mm(xi) ** 2).sum())
    assert float(cos.abs().max()) < 1e-10


def test_teleport_keeps_loss_and_raises_gradient(gen):
    m = _mlp(gen)
    x, y = _data(gen)
    group = gaugenet.symmetries(m, x[:2])

    def loss_and_grad(mm):
        value = F.cross_entropy(mm(x), y)
        grads = torch.autograd.grad(value, list(mm.parameters()))
        return float(value), float(sum((g**2).sum() for g in grads))

    moved = teleport(m, group, F.cross_entropy, (x, y), steps=8, lr=0.5)
    (l0, g0), (l1, g1) = loss_and_grad(m), loss_and_grad(moved)
    assert abs(l1 - l0) < 1e-10
    assert g1 > 1.05 * g0
    # negative: the parameters did move
    assert (
        max(float((a - b).abs().max()) for a, b in zip(m.parameters(), moved.parameters())) > 1e-3
    )


def test_teleporting_wrapper_trains(gen):
    m = _mlp(gen)
    x, y = _data(gen)
    group = gaugenet.symmetries(m, x[:2])
    opt = Teleporting(
        torch.optim.SGD(m.parameters(), lr=0.05),
        every=5,
        model=m,
        group=group,
        loss_fn=F.cross_entropy,
        steps=3,
        lr=0.5,
    )
    start = float(F.cross_entropy(m(x), y))
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step((x, y))
    assert opt.teleports == 2
    assert float(F.cross_entropy(m(x), y)) < start
    with pytest.raises(gaugenet.GaugeError):
        Teleporting(
            torch.optim.SGD(m.parameters(), lr=0.1),
            every=0,
            model=m,
            group=group,
            loss_fn=F.cross_entropy,
        )


def test_attention_gl_charges(gen):
    from gaugenet.nets import SelfAttention

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m0 = SelfAttention(6, 2, activation="softmax").double()
    x = torch.randn(8, 5, 6, dtype=torch.float64, generator=gen)
    y = torch.randn(8, 5, 6, dtype=torch.float64, generator=gen)
    group = gaugenet.symmetries(m0, x[:2])
    gl = [f.name for f in group.of_kind("gl")]
    assert gl
    q0 = noether_charges(m0, group)
    cos = orthogonality(m0, group, lambda mm: F.mse_loss(mm(x), y))
    assert float(cos.abs().max()) < 1e-10

    def run(lr, steps, wd=0.0):
        m = copy.deepcopy(m0)
        opt = torch.optim.SGD(m.parameters(), lr=lr, weight_decay=wd)
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(m(x), y).backward()
            opt.step()
        with torch.no_grad():
            return noether_charges(m, group)

    d1, d2 = run(5e-3, 10), run(5e-4, 100)
    for name in gl:
        ratio = float((d1[name] - q0[name]).abs().max() / (d2[name] - q0[name]).abs().max())
        assert 7 < ratio < 13  # drift ∝ η at fixed t = 0.05
    decayed = run(1e-3, 300, wd=1.0)  # t = 0.3: factor exp(−0.6)
    for name in gl:
        big = q0[name].abs() > 0.2 * q0[name].abs().max()
        ratio = (decayed[name] / q0[name].detach())[big]
        torch.testing.assert_close(ratio, torch.full_like(ratio, torch.e**-0.6), rtol=0.03, atol=0)


def test_teleport_objectives(gen):
    m = _mlp(gen)
    x, y = _data(gen)
    group = gaugenet.symmetries(m, x[:2])

    def stats(mm):
        value = F.cross_entropy(mm(x), y)
        grads = torch.autograd.grad(value, list(mm.parameters()))
        sq = float(sum((g**2).sum() for g in grads))
        norm = float(sum((p**2).sum() for p in mm.parameters()))
        return float(value), sq, norm

    def after_sgd(mm, lr):
        value = F.cross_entropy(mm(x), y)
        grads = torch.autograd.grad(value, list(mm.parameters()))
        with torch.no_grad():
            for p, g in zip(mm.parameters(), grads):
                p -= lr * g
        return float(F.cross_entropy(mm(x), y))

    l0, g0, n0 = stats(m)
    capped = teleport(m, group, F.cross_entropy, (x, y), steps=20, lr=1.0, max_gain=1.5)
    l1, g1, _ = stats(capped)
    assert abs(l1 - l0) < 1e-10 and g1 > g0
    free = teleport(m, group, F.cross_entropy, (x, y), steps=20, lr=1.0)
    assert g1 < stats(free)[1]  # the cap stops the ascent early
    balanced = teleport(m, group, F.cross_entropy, (x, y), steps=10, lr=1.0, objective="norm")
    l2, _, n2 = stats(balanced)
    assert abs(l2 - l0) < 1e-10 and n2 < n0
    ahead = teleport(
        m, group, F.cross_entropy, (x, y), steps=5, lr=1.0, objective="lookahead", sgd_lr=0.5
    )
    assert abs(stats(ahead)[0] - l0) < 1e-10
    assert after_sgd(copy.deepcopy(ahead), 0.5) < after_sgd(copy.deepcopy(m), 0.5)
    with pytest.raises(gaugenet.GaugeError):
        teleport(m, group, F.cross_entropy, (x, y), objective="lookahead")
    with pytest.raises(gaugenet.GaugeError):
        teleport(m, group, F.cross_entropy, (x, y), objective="hessian")
