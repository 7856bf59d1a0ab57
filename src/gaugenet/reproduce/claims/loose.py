"""Claims that measure the places where the paper is loose, each by its counterexample.

Each claim's criterion holds on what is right (the corrected formula, the condition that is
really needed) and its measurement returns nan unless the paper's reading, as printed, is off
by a measurable amount: the claim fails if either half fails.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from ..._errors import NotLiftableError
from ..._invariance import invariance_error
from ...discovery import symmetries
from ...ode import Chebyshev, LinearNODE, lift_equivalence, random_gauge_path, wilson_line
from .._registry import Context, Measurement, claim

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _node(d: int, gen: torch.Generator) -> LinearNODE:
    w = Chebyshev.random((d, d), 4, 1.0, scale=0.8, generator=gen)
    return LinearNODE(w, Chebyshev.random((d,), 3, 1.0, generator=gen), 1.0)


@claim(
    "loose.eq24-vs-eq25",
    reference="eq. (24)-(25)",
    statement="the node transformed by (25) follows x' = G⁻¹(x − c), not (24)'s x' = G x + c",
    measured="max relative gap of x'(t) to G⁻¹(x(t) − c(t)) at 9 times, d = 3; nan unless the "
    "gap to G x + c exceeds 0.1",
    tolerance=1e-10,
    loose="(24) writes the transformation as x ↦ G x + c, but the weights of (25) are those "
    "of the inverse map: the node transformed by (25) follows G⁻¹(x − c)",
)
def _eq24_vs_25(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    node = _node(3, gen)
    x0 = torch.randn(6, 3, dtype=F64, generator=gen)
    G, c = random_gauge_path(3, scale=0.8, generator=gen)
    new = node.gauge_transform(G, c)
    ts = torch.linspace(0.0, 1.0, 9, dtype=F64)
    with torch.no_grad():
        x, x_new = node.trajectory(x0, ts), new.trajectory(x0, ts)
        Gt, ct = G(ts), c(ts)
        inverse = torch.linalg.solve(Gt[:, None], (x - ct[:, None])[..., None])[..., 0]
        forward = (Gt[:, None] @ x[..., None])[..., 0] + ct[:, None]
    right, printed = _rel(x_new, inverse), _rel(x_new, forward)
    value = right if printed > 0.1 else math.nan
    return Measurement(value, f"G⁻¹(x − c): {right:.1e}; (24)'s G x + c: off by {printed:.2f}")


def _eq22(w, b, x0: torch.Tensor, sign: float, order: int = 40) -> torch.Tensor:
    """`W(w)_{T:0} (x0 + ∫ W(sign·w)_{0:t'} b(t') dt')`, T = 1, by Gauss-Legendre quadrature."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    t = torch.as_tensor((nodes + 1) / 2, dtype=F64)
    wq = torch.as_tensor(weights / 2, dtype=F64)
    W0t = wilson_line(lambda s: sign * w(s), torch.zeros_like(t), t, rtol=1e-13)
    integral = (wq[:, None] * (W0t @ b(t)[..., None])[..., 0]).sum(0)
    return wilson_line(w, 1.0, 0.0, rtol=1e-13) @ (x0 + integral)


@claim(
    "loose.eq22-printed",
    reference="eq. (22)-(23)",
    statement="x(T) = W(w)_{T:0} (x(0) + ∫ W(w)_{0:t'} b dt'); the printed W(−w)_{0:t'} is wrong",
    measured="relative gap of the corrected (22) to the solved x(T) (random d = 3 field); nan "
    "unless the printed form is off by more than 1e-2 on both the scalar and the random case",
    tolerance=1e-10,
    loose="(22) is printed with W(−w)_{0:t'}, which under (23)'s definition is W_{t':0}, not its "
    "inverse: scalar w = 0.7, b = 1, x(0) = 0 gives 2.916 instead of x(T) = 1.448; "
    "W(w)_{0:t'} is right",
)
def _eq22_printed(ctx: Context) -> Measurement:
    def w1(t):
        return torch.full((t.shape[0], 1, 1), 0.7, dtype=F64)

    def b1(t):
        return torch.ones(t.shape[0], 1, dtype=F64)

    zero = torch.zeros(1, dtype=F64)
    exact1 = LinearNODE(w1, b1, 1.0)(zero[None])[0]
    printed1 = _eq22(w1, b1, zero, -1.0)
    gen = torch.Generator().manual_seed(ctx.seed)
    node = _node(3, gen)
    x0 = torch.randn(3, dtype=F64, generator=gen)
    with torch.no_grad():
        exact = node(x0[None])[0]
        right = _rel(_eq22(node.w, node.b, x0, 1.0), exact)
        printed = _rel(_eq22(node.w, node.b, x0, -1.0), exact)
    off1 = _rel(printed1, exact1)
    value = right if min(printed, off1) > 1e-2 else math.nan
    return Measurement(
        value,
        f"scalar w = 0.7, b = 1: x(T) = {float(exact1):.4f}, printed (22) {float(printed1):.4f}; "
        f"random field: corrected {right:.1e}, printed off by {printed:.1e}",
    )


def _cycle(d: int, perm: list[int]) -> torch.Tensor:
    return torch.eye(d, dtype=F64)[perm]


@claim(
    "loose.footnote9-sign",
    reference="footnote 9, Theorem 3.1",
    statement="a permutation of det +1 (a 3-cycle) at the interior layers lifts to a smooth "
    "diffeomorphism; a transposition (det −1) does not",
    measured="max relative gap of disc(NODE_B) to NN_B and of NODE_B(x) to NODE_A(x) for the "
    "3-cycle (d = 3, N = 4); nan unless the transposition raises NotLiftableError",
    tolerance=1e-10,
    loose="footnote 9 calls permutations of hidden units discrete gauge symmetries that no "
    "smooth deformation reaches; this holds only for permutations of negative sign (at some "
    "layer): an even permutation lies in GL⁺(d) and lifts by Theorem 3.1",
)
def _footnote9(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    d, N = 3, 4
    node_a = _node(d, gen)
    x = torch.randn(8, d, dtype=F64, generator=gen)
    eye, zero = torch.eye(d, dtype=F64), torch.zeros(d, dtype=F64)
    cs = [zero] * (N + 1)
    cyc = _cycle(d, [1, 2, 0])
    Gs = [eye, *[cyc] * (N - 1), eye]
    net_b = node_a.discretize(N).gauge_transform(Gs, cs)
    _, _, node_b = lift_equivalence(node_a, Gs, cs, N)
    nb = node_b.discretize(N)
    gap = max(
        _rel(a, b) for a, b in zip([*nb.weights, *nb.biases], [*net_b.weights, *net_b.biases])
    )
    with torch.no_grad():
        gap = max(gap, _rel(node_b(x), node_a(x)))
    swap = _cycle(d, [1, 0, 2])
    try:
        lift_equivalence(node_a, [eye, *[swap] * (N - 1), eye], cs, N)
    except NotLiftableError:
        return Measurement(gap, "the transposition raises NotLiftableError (det w̄'_n < 0)")
    return Measurement(math.nan, "the transposition was lifted, which is impossible")


def _bn_net() -> nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-12), nn.ReLU(), nn.Conv2d(4, 2, 3)
    )
    net = net.double()
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4, dtype=F64, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(4, dtype=F64, generator=gen))
        bn.weight.copy_(torch.randn(4, dtype=F64, generator=gen))
        bn.bias.copy_(torch.randn(4, dtype=F64, generator=gen))
    return net.eval()


@claim(
    "loose.appC-batchnorm",
    reference="App. C",
    statement="eval-mode BatchNorm keeps a paired per-channel rescaling exactly; train-mode "
    "BatchNorm breaks it but makes the layer before it scale invariant on its own",
    measured="max relative output change of (a) the paired rescaling, eval mode, and (b) "
    "scaling the conv before a train-mode BatchNorm alone (BatchNorm eps 1e-12, the only "
    "thing that breaks (b)); nan unless the paired rescaling "
    "changes the train-mode output by more than 1e-2",
    tolerance=1e-10,
    loose="App. C says normalization layers ruin the rescaling symmetry: true for train-mode "
    "BatchNorm only; in eval mode the paired rescaling (through the running statistics) is "
    "exact, and in train mode the layer before the normalization has a rescaling of its own",
)
def _batchnorm(ctx: Context) -> Measurement:
    net = _bn_net()
    x = torch.randn(8, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(ctx.seed))
    group = symmetries(net, x)
    g = group.sample(torch.Generator().manual_seed(ctx.seed), discrete=False)
    moved = group.act(net, g)
    eval_change = invariance_error(net, moved, x)
    net.train(), moved.train()
    train_change = invariance_error(net, moved, x)
    alone = copy.deepcopy(net)
    alpha = torch.exp(torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        alone[0].weight.mul_(alpha[:, None, None, None])
        alone[0].bias.mul_(alpha)
    lone = invariance_error(net, alone, x)
    value = max(eval_change, lone) if train_change > 1e-2 else math.nan
    return Measurement(
        value,
        f"eval, paired: {eval_change:.1e}; train, paired: changes by {train_change:.2f}; "
        f"train, conv alone: {lone:.1e}",
    )
