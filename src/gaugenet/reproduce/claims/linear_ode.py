"""Claims of Sec. 2.3 and 3.1: Wilson lines, gauge transformations of linear neural ODEs, the
integrated relation to linear networks, and Theorem 3.1 with its GL⁺(d) assumption.

The work-precision benchmark of Wilson lines against torchdiffeq and scipy takes minutes and
is not a claim; run it with `.venv/bin/python benchmarks/wilson_lines.py`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..._errors import NotLiftableError
from ...nets import LinearNetwork
from ...ode import (
    Chebyshev,
    LinearNODE,
    Magnus4,
    Magnus6,
    TimePath,
    lift_equivalence,
    lift_network,
    random_gauge_path,
    wilson_line,
)
from .._registry import Context, Measurement, claim

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _field(d: int, gen: torch.Generator):
    A = torch.randn(3, d, d, dtype=F64, generator=gen) / math.sqrt(d)
    tr = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)

    def w(t: torch.Tensor) -> torch.Tensor:
        return (
            A[0] + torch.sin(3 * t)[:, None, None] * A[1] + torch.cos(5 * t)[:, None, None] * A[2]
        )

    def int_trace(t1: float, t0: float) -> float:
        def prim(t):
            return tr[0] * t - tr[1] * math.cos(3 * t) / 3 + tr[2] * math.sin(5 * t) / 5

        return float(prim(t1) - prim(t0))

    return w, int_trace


def _node(d: int, gen: torch.Generator, T: float = 1.0) -> LinearNODE:
    w = Chebyshev.random((d, d), 4, T, scale=0.8, generator=gen)
    return LinearNODE(w, Chebyshev.random((d,), 3, T, generator=gen), T)


def _net_gap(a: LinearNetwork, b: LinearNetwork) -> float:
    return max(_rel(x, y) for x, y in zip([*a.weights, *a.biases], [*b.weights, *b.biases]))


@claim(
    "linear_ode.wilson-line-group-laws",
    reference="eq. (23)",
    statement="W_{t3:t2} W_{t2:t1} = W_{t3:t1} and det W_{t1:t0} = exp ∫ tr w",
    measured="max relative error of both laws, d = 8, Magnus6 at rtol 1e-13",
    tolerance=1e-12,
)
def _group_laws(ctx: Context) -> Measurement:
    w, int_trace = _field(8, torch.Generator().manual_seed(ctx.seed))
    W10, W21, W20 = (
        wilson_line(w, a, b, rtol=1e-13) for a, b in ((0.7, 0.0), (1.6, 0.7), (1.6, 0.0))
    )
    comp = _rel(W21 @ W10, W20)
    det = float(torch.linalg.det(W20))
    det_err = abs(det - math.exp(int_trace(1.6, 0.0))) / abs(det)
    wrong = _rel(W10 @ W21, W20)
    return Measurement(
        max(comp, det_err),
        f"composition {comp:.1e}, det {det_err:.1e}; reversed product off by {wrong:.2f}",
    )


@claim(
    "linear_ode.magnus-order",
    reference="eq. (23)",
    statement="the Wilson-line integrator converges at its declared order (6)",
    measured="fitted log-log slope of the error against the step count, Magnus6, d = 5",
    tolerance=0.3,
    compare="near",
    target=6.0,
)
def _order(ctx: Context) -> Measurement:
    w, _ = _field(5, torch.Generator().manual_seed(ctx.seed))
    ref = wilson_line(w, 1.0, 0.0, steps=400)
    ns = np.array([6, 8, 12, 16, 24])
    slopes = []
    for method in (Magnus6(), Magnus4()):
        errs = [_rel(wilson_line(w, 1.0, 0.0, steps=int(n), method=method), ref) for n in ns]
        slopes.append(-np.polyfit(np.log(ns), np.log(errs), 1)[0])
    return Measurement(float(slopes[0]), f"Magnus4 (declared 4): {slopes[1]:.2f}")


@claim(
    "linear_ode.wilson-vs-dopri8",
    reference="eq. (23)",
    statement="the Magnus Wilson line agrees with a high-order ODE solve of Ẇ = w W",
    measured="relative gap to torchdiffeq dopri8 at rtol 1e-12, d = 16",
    tolerance=1e-10,
)
def _vs_dopri8(ctx: Context) -> Measurement:
    from torchdiffeq import odeint

    d = 16
    w, _ = _field(d, torch.Generator().manual_seed(ctx.seed))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ref = odeint(
        lambda s, y: w(s.reshape(1))[0] @ y,
        torch.eye(d, dtype=F64),
        t,
        method="dopri8",
        rtol=1e-12,
        atol=1e-12,
        options={"step_t": t[1:]},
    )[-1]
    W, est = wilson_line(w, 1.0, 0.0, rtol=1e-12, return_error=True)
    return Measurement(_rel(W, ref), f"Magnus6 error estimate {est:.1e}")


@claim(
    "linear_ode.gauge-invariance",
    reference="eq. (24)-(25), (46)",
    statement="x(T) and W_{T:0} are invariant under paths with G(0) = G(T) = 1, c(0) = c(T) = 0",
    measured="max relative change of x(T) and W_{T:0} over 10 random (G, c) paths, d = 4",
    tolerance=1e-10,
)
def _gauge_invariance(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    node = _node(4, gen, T=1.5)
    x = torch.randn(8, 4, dtype=F64, generator=gen)
    y, H = node(x), node.holonomy()
    err = 0.0
    for _ in range(2 if ctx.quick else 10):
        G, c = random_gauge_path(4, node.T, scale=0.7, generator=gen)
        new = node.gauge_transform(G, c)
        err = max(err, _rel(new(x), y), _rel(new.holonomy(), H))
    A = torch.randn(4, 4, dtype=F64, generator=gen) / 2
    broken = node.gauge_transform(lambda t: torch.linalg.matrix_exp(t / node.T * A), check=False)
    return Measurement(
        err, f"a path with G(T) = exp(A) ≠ 1 changes x(T) by {_rel(broken(x), y):.2f}"
    )


@claim(
    "linear_ode.integrated-relation",
    reference="eq. (32)",
    statement="w̄_n = W_{(n+1)Δ:nΔ}, b̄_n = ∫ W b discretize a linear NODE exactly, for every N",
    measured="max relative gap between the N-layer network and x(T), N = 1 … 32",
    tolerance=1e-10,
)
def _integrated(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    node = _node(4, gen)
    x = torch.randn(8, 4, dtype=F64, generator=gen)
    y = node(x)
    exact = max(_rel(node.discretize(n)(x), y) for n in (1, 2, 4, 8, 16, 32))
    euler = _rel(node.discretize(32, scheme="euler")(x), y)
    return Measurement(exact, f"the finite difference 1 + Δw is off by {euler:.1e} at N = 32")


@claim(
    "linear_ode.euler-first-order",
    reference="eq. (32)",
    statement="the finite-difference network w̄ = 1 + Δ w only approximates, with error O(1/N)",
    measured="fitted log-log slope of the Euler network's error against N (16 … 256)",
    tolerance=0.2,
    compare="near",
    target=1.0,
)
def _euler(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    node = _node(4, gen)
    x = torch.randn(8, 4, dtype=F64, generator=gen)
    y = node(x)
    ns = np.array([16, 32, 64, 128, 256])
    errs = [_rel(node.discretize(int(n), scheme="euler")(x), y) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    return Measurement(float(slope), f"errors {errs[0]:.1e} (N=16) … {errs[-1]:.1e} (N=256)")


def _gauge_parameters(gen: torch.Generator, d: int, N: int, relu: bool):
    eye, zero = torch.eye(d, dtype=F64), torch.zeros(d, dtype=F64)
    if relu:
        inner = [
            torch.diag(torch.exp(torch.randn(d, dtype=F64, generator=gen))) for _ in range(N - 1)
        ]
        return [eye, *inner, eye], [zero] * (N + 1)
    inner = [
        torch.linalg.matrix_exp(0.6 * torch.randn(d, d, dtype=F64, generator=gen))
        for _ in range(N - 1)
    ]
    cs = [zero, *[torch.randn(d, dtype=F64, generator=gen) for _ in range(N - 1)], zero]
    return [eye, *inner, eye], cs


@claim(
    "linear_ode.theorem-3.1-diagram",
    reference="Theorem 3.1, Fig. 2",
    statement="a discrete gauge map NN_A → NN_B lifts to NODE_A → NODE_B, disc(NODE_B) = NN_B",
    measured="max relative gap of disc(NODE_B) to NN_B and NODE_B(x) to NODE_A(x), GL⁺ and ReLU",
    tolerance=1e-10,
)
def _diagram(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    d, N = 3, 4
    node_a = _node(d, gen)
    x = torch.randn(8, d, dtype=F64, generator=gen)
    errs = []
    for relu in (False, True):
        Gs, cs = _gauge_parameters(gen, d, N, relu)
        net_b = node_a.discretize(N).gauge_transform(Gs, cs)
        _, _, node_b = lift_equivalence(node_a, Gs, cs, N)
        errs += [_net_gap(node_b.discretize(N), net_b), _rel(node_b(x), node_a(x))]
    return Measurement(
        max(errs), "GL⁺: disc {:.1e}, output {:.1e}; ReLU: disc {:.1e}, output {:.1e}".format(*errs)
    )


@claim(
    "linear_ode.theorem-3.1-needs-gl-plus",
    reference="Theorem 3.1, footnote 9",
    statement="with G_n = diag(−1,1,1) inside, NN_B has a weight of det < 0 and lifts to no NODE",
    measured="most negative det w̄'_n of NN_B (d = 3, N = 4); nan unless NotLiftableError is raised",
    loose="Theorem 3.1 needs every G_n in GL⁺(d) (det > 0), which the paper does not say: "
    "with det G_n < 0 inside, NN_B is the discretization of no linear neural ODE",
    tolerance=0.0,
)
def _counterexample(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    d, N = 3, 4
    node_a = _node(d, gen)
    R = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=F64))
    Gs = [torch.eye(d, dtype=F64), R, R, R, torch.eye(d, dtype=F64)]
    cs = [torch.zeros(d, dtype=F64)] * (N + 1)
    net_b = node_a.discretize(N).gauge_transform(Gs, cs)
    dets = [float(torch.linalg.det(w.detach())) for w in net_b.weights]
    try:
        lift_equivalence(node_a, Gs, cs, N)
    except NotLiftableError as err:
        named = "n = [0, 3]" in str(err)
        return Measurement(
            min(dets), f"dets {[round(v, 3) for v in dets]}; error names the layers: {named}"
        )
    return Measurement(math.nan, "lift_equivalence did not raise")


@claim(
    "linear_ode.lift-network",
    reference="Sec. 3.1",
    statement="every linear network with all det w̄_n > 0 is the discretization of a linear NODE",
    measured="max relative gap of lift_network(net).discretize(N) to net, negative eigenvalues",
    tolerance=1e-10,
)
def _lift(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    d, errs = 3, []
    for depth in (2, 5):
        ws = []
        for n in range(depth):
            S = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, dtype=F64, generator=gen)
            eig = [-1.5, -0.5, 2.0] if n % 2 == 0 else [0.5, 1.0, 3.0]
            ws.append(S @ torch.diag(torch.tensor(eig, dtype=F64)) @ torch.linalg.inv(S))
        net = LinearNetwork(ws, [torch.randn(d, dtype=F64, generator=gen) for _ in ws])
        errs.append(_net_gap(lift_network(net).discretize(depth), net))
    return Measurement(max(errs), "every other weight has eigenvalues −1.5, −0.5 (no real log)")


@claim(
    "linear_ode.gauge-fixing",
    reference="Sec. 2.3, eq. (45)",
    statement="constant (w' = log W_{T:0}/T) and straight-line (W' = 1 + t w₀) gauges keep x(T)",
    measured="max of the x(T) changes, the spread of w', the gap of W'_{t:0} to 1 + t w₀",
    tolerance=1e-10,
)
def _gauge_fixing(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    node = _node(4, gen, T=1.5)
    x = torch.randn(8, 4, dtype=F64, generator=gen)
    y = node(x)
    const, _ = node.to_constant_gauge()
    line, _ = node.to_straight_line_gauge()
    t = torch.linspace(0, node.T, 7, dtype=F64)
    spread = float((const.w(t) - const.w(t[:1])).abs().max())
    w0 = (node.holonomy() - torch.eye(4, dtype=F64)) / node.T
    straight = _rel(
        line.wilson_line(t, torch.zeros((), dtype=F64)),
        torch.eye(4, dtype=F64) + t[:, None, None] * w0,
    )
    errs = [_rel(const(x), y), _rel(line(x), y), spread, straight]
    return Measurement(
        max(errs), "x(T): {:.1e}, {:.1e}; w' spread {:.1e}; linearity {:.1e}".format(*errs)
    )


@claim(
    "linear_ode.eq27-time-reparametrization",
    reference="eq. (26)-(27)",
    statement="G = 1 + s ε w, c = s ε b inserted into (25) is the time reparametrization "
    "t ↦ t − s ε to first order (so (27) follows (24), not (25))",
    measured="fitted log-log slope of max |w', b' of (25) − those of τ(t) = t − s ε(t)| over "
    "s = 1e-1 … 1e-4 (d = 3); nan unless reparametrize_time's own gauge path reproduces its "
    "node (to 1e-9) and the residual against t + s ε is O(s)",
    tolerance=0.2,
    compare="near",
    target=2.0,
    loose="(27) writes the infinitesimal time reparametrization as G = 1 + εw, c = εb in the "
    "sense of (24), x ↦ G x + c; inserted into (25), the transformation of the weights, the "
    "same G and c realize t ↦ t − ε",
)
def _eq27(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    node = _node(3, gen)
    T = node.T
    a = 0.5 + torch.rand(2, dtype=F64, generator=gen)

    def eps(t: torch.Tensor) -> torch.Tensor:
        return torch.sin(math.pi * t / T) * (a[0] + a[1] * t / T)

    ts = torch.linspace(0.05, 0.95, 7, dtype=F64) * T
    eye = torch.eye(3, dtype=F64)

    def fields(n: LinearNODE) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([n.w(ts).flatten(1), n.b(ts)], 1)

    ss = np.array(
        [1e-1, 1e-2, 1e-3, 1e-4] if ctx.quick else [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4]
    )
    right, opposite = [], []
    for s in ss:
        G = TimePath(lambda t, s=s: eye + s * eps(t)[:, None, None] * node.w(t), vectorized=True)
        c = TimePath(lambda t, s=s: s * eps(t)[:, None] * node.b(t), vectorized=True)
        gauged = fields(node.gauge_transform(G, c))
        for sign, out in ((-1.0, right), (1.0, opposite)):
            tau = node.reparametrize_time(lambda t, sign=sign, s=s: t + sign * s * eps(t))[0]
            out.append(float((gauged - fields(tau)).abs().max()))
    slope = float(np.polyfit(np.log(ss), np.log(right), 1)[0])
    wrong = float(np.polyfit(np.log(ss), np.log(opposite), 1)[0])
    new, (G, c) = node.reparametrize_time(lambda t: t - 0.1 * eps(t))
    exact = float((fields(node.gauge_transform(G, c)) - fields(new)).abs().max())
    ok = exact < 1e-9 and abs(wrong - 1.0) < 0.2
    return Measurement(
        slope if ok else math.nan,
        f"against t − sε: residuals {right[0]:.1e} … {right[-1]:.1e}; against t + sε: slope "
        f"{wrong:.2f} (O(s)); reparametrize_time's path Ĝ = Â_{{t:τ(t)}} reproduces its node "
        f"to {exact:.1e}",
    )
