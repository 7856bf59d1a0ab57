"""Theorem 3.1 made constructive: lifting discrete gauge transformations and linear networks
to linear neural ODEs, and where that is impossible.

A continuous `G(t)` with `G(0) = 1` keeps `det G(t) > 0`, and every Wilson line has
`det W > 0`. So a discrete gauge parameter `G_n` with `det G_n < 0` (a reflection, an odd
permutation of hidden units: the discrete gauge symmetries of the paper's footnote 9) is
reached by no diffeomorphism, and a network weight with `det w̄_n <= 0` is the discretization
of no linear neural ODE. Everything in GL⁺(d) lifts: through a real matrix logarithm where
one exists, else through the polar decomposition `M = Q P` (`Q ∈ SO(d)`, `P` symmetric
positive definite), both of which have real logarithms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .._errors import GaugeError, NotLiftableError
from ..nets import LinearNetwork
from ._gauge_paths import TimePath
from ._linear_node import LinearNODE
from ._parametrizations import PiecewiseConstant

__all__ = ["generator_pieces", "lift_equivalence", "lift_network", "principal_log"]


def principal_log(M: Tensor) -> Tensor | None:
    """The real principal logarithm of `M` `(d, d)`, or `None` when `M` has an eigenvalue on
    `(−∞, 0]` (then no real principal logarithm exists)."""
    a = M.detach().double().cpu().numpy()
    ev = np.linalg.eigvals(a)
    scale = max(np.abs(ev).max(), 1e-300)
    if np.any((np.abs(ev.imag) <= 1e-12 * scale) & (ev.real <= 1e-14 * scale)):
        return None
    L = scipy.linalg.logm(a)
    if np.iscomplexobj(L):
        if np.abs(L.imag).max() > 1e-9 * max(1.0, np.abs(L).max()):
            return None
        L = L.real
    return torch.as_tensor(np.ascontiguousarray(L), dtype=M.dtype)


def _rotation_log(Q: np.ndarray) -> np.ndarray:
    """A real logarithm of a rotation `Q ∈ SO(d)` via its real Schur form, which is block
    diagonal with 2×2 rotation blocks and ±1 entries; the −1 entries come in pairs (det = 1)
    and each pair is a rotation by π in its plane."""
    S, Z = scipy.linalg.schur(Q, output="real")
    d = Q.shape[0]
    L = np.zeros_like(S)
    minus, i = [], 0
    while i < d:
        if i + 1 < d and abs(S[i + 1, i]) > 1e-13:
            theta = math.atan2(S[i + 1, i], S[i, i])
            L[i, i + 1], L[i + 1, i] = -theta, theta
            i += 2
            continue
        if S[i, i] < 0:
            minus.append(i)
        i += 1
    for j, k in zip(minus[0::2], minus[1::2]):
        L[j, k], L[k, j] = -math.pi, math.pi
    return Z @ L @ Z.T


def generator_pieces(M: Tensor) -> list[Tensor]:
    """Real matrices `[L_1, ..., L_k]` with `exp(L_k) ⋯ exp(L_1) = M` for `M ∈ GL⁺(d)`: the
    principal logarithm (`k = 1`) where it is real, else the polar pieces `[log P, log Q]`."""
    L = principal_log(M)
    if L is not None:
        return [L]
    Q, P = scipy.linalg.polar(M.detach().double().cpu().numpy(), side="right")
    lam, V = np.linalg.eigh(P)
    log_p = (V * np.log(lam)) @ V.T
    return [torch.as_tensor(x, dtype=M.dtype) for x in (log_p, _rotation_log(Q))]


def _smoothstep(s: Tensor) -> tuple[Tensor, Tensor]:
    """`σ(s) = s³(10 − 15 s + 6 s²)` and `σ'(s)`: `σ(0) = 0`, `σ(1) = 1`, `σ'`, `σ''` vanish at
    both ends, so the glued path is C² at the layer times."""
    return s**3 * (10 - 15 * s + 6 * s**2), 30 * s**2 * (1 - s) ** 2


def _check_ends(Gs: Tensor, cs: Tensor) -> None:
    eye = torch.eye(Gs.shape[-1], dtype=Gs.dtype)
    for n in (0, Gs.shape[0] - 1):
        if float((Gs[n] - eye).abs().max()) > 1e-12 or float(cs[n].abs().max()) > 1e-12:
            raise GaugeError(f"boundary condition violated: need G_{n} = 1 and c_{n} = 0")


def _geodesic_path(Gs: Tensor, cs: Tensor, T: float) -> tuple[TimePath, TimePath]:
    """`G(t) = G_n exp(σ(s) L_n^{(2)}) exp(σ(s) L_n^{(1)})` on `[nΔ, (n+1)Δ]`, `s = t/Δ − n`,
    with `exp(L^{(2)}) exp(L^{(1)}) = G_n⁻¹ G_{n+1}`; `c` interpolated by the same `σ`."""
    N, d = Gs.shape[0] - 1, Gs.shape[-1]
    L1 = torch.zeros(N, d, d, dtype=Gs.dtype)
    L2 = torch.zeros(N, d, d, dtype=Gs.dtype)
    for n in range(N):
        pieces = generator_pieces(torch.linalg.solve(Gs[n], Gs[n + 1]))
        L1[n] = pieces[0]
        if len(pieces) == 2:
            L2[n] = pieces[1]
    delta = T / N

    def parts(t: Tensor):
        n = torch.clamp(torch.floor(t / delta), 0, N - 1).long()
        sig, dsig = _smoothstep(t / delta - n.to(t.dtype))
        E1 = torch.linalg.matrix_exp(sig[:, None, None] * L1[n])
        E2 = torch.linalg.matrix_exp(sig[:, None, None] * L2[n])
        return n, sig, dsig, E1, E2

    def G(t: Tensor) -> Tensor:
        n, _, _, E1, E2 = parts(t)
        return Gs[n] @ E2 @ E1

    def G_dot(t: Tensor) -> Tensor:
        n, _, dsig, E1, E2 = parts(t)
        inner = L2[n] @ E2 @ E1 + E2 @ L1[n] @ E1
        return (dsig / delta)[:, None, None] * (Gs[n] @ inner)

    def c(t: Tensor) -> Tensor:
        n, sig, _, _, _ = parts(t)
        return cs[n] + sig[:, None] * (cs[n + 1] - cs[n])

    def c_dot(t: Tensor) -> Tensor:
        n, _, dsig, _, _ = parts(t)
        return (dsig / delta)[:, None] * (cs[n + 1] - cs[n])

    knots = torch.linspace(0.0, T, N + 1, dtype=Gs.dtype)[1:-1]
    return (
        TimePath(G, G_dot, vectorized=True, breakpoints=knots),
        TimePath(c, c_dot, vectorized=True, breakpoints=knots),
    )


def lift_equivalence(
    node_a: LinearNODE, Gs: Sequence[Tensor], cs: Sequence[Tensor], N: int
) -> tuple[TimePath, TimePath, LinearNODE]:
    """Theorem 3.1 (Fig. 2): lift the discrete gauge transformation `(G_n, c_n)` of eq. (33),
    relating `NN_A = node_a.discretize(N)` to `NN_B = NN_A.gauge_transform(Gs, cs)`, to a
    continuous one.

    **Arguments:**

    - `node_a`: the linear neural ODE A.
    - `Gs`, `cs`: `N + 1` matrices `(d, d)` and shifts `(d,)`, `G_0 = G_N = 1`, `c_0 = c_N = 0`.
    - `N`: the number of layers.

    **Returns:** `(G, c, node_b)`: smooth paths with `G(nΔ) = G_n`, `c(nΔ) = c_n`, and
    `node_b = node_a.gauge_transform(G, c)`, so that `node_b.discretize(N)` is `NN_B` and
    `node_b(x) = node_a(x)`.

    Raises `NotLiftableError` when some `det G_n <= 0` (the theorem's hidden assumption is
    GL⁺(d)), naming those layers and the weights of `NN_B` whose determinant turned negative.
    """
    if len(Gs) != N + 1 or len(cs) != N + 1:
        raise GaugeError(
            f"lift_equivalence: need N + 1 = {N + 1} G_n and c_n, got {len(Gs)}, {len(cs)}"
        )
    Gs = torch.stack([torch.as_tensor(G, dtype=node_a.dtype) for G in Gs])
    cs = torch.stack([torch.as_tensor(c, dtype=node_a.dtype) for c in cs])
    if Gs.shape[1:] != (node_a.d, node_a.d) or cs.shape[1:] != (node_a.d,):
        raise GaugeError(
            f"lift_equivalence: G_n must be ({node_a.d}, {node_a.d}), c_n ({node_a.d},)"
        )
    _check_ends(Gs, cs)
    sign, _ = torch.linalg.slogdet(Gs)
    bad = [n for n in range(N + 1) if sign[n] <= 0]
    if bad:
        net_b = node_a.discretize(N).gauge_transform(list(Gs), list(cs))
        flipped = [
            n for n, w in enumerate(net_b.weights) if float(torch.linalg.det(w.detach())) < 0
        ]
        raise NotLiftableError(
            f"det G_n <= 0 at layers n = {bad}: such G_n lie outside GL⁺(d), so no continuous "
            f"G(t) with G(0) = 1 reaches them. NN_B's weights w̄'_n at n = {flipped} have negative "
            "determinant, and no Wilson line does; NN_B is the discretization of no linear neural "
            "ODE. This is a discrete gauge symmetry of the network (footnote 9), reached by no "
            "diffeomorphism."
        )
    G, c = _geodesic_path(Gs, cs, node_a.T)
    return G, c, node_a.gauge_transform(G, c)


def lift_network(net: LinearNetwork, T: float = 1.0) -> LinearNODE:
    """A linear neural ODE on `[0, T]` whose exact discretization with `N = net.depth` layers is
    `net`, with piecewise-constant `w`, `b`.

    On layer `n` the generator is `log([[w̄_n, b̄_n], [0, 1]]) / Δ` where the principal
    logarithm is real; when `w̄_n` has a negative real eigenvalue (det still > 0) every layer
    is split in two halves and layer `n` runs `log P` and then `log Q` of `w̄_n = Q P`, with
    the bias on the second half. Raises `NotLiftableError` naming the layers with
    `det w̄_n <= 0`.
    """
    ws = [w.detach() for w in net.weights]
    bs = [b.detach() for b in net.biases]
    N, d, dtype = len(ws), net.d, ws[0].dtype
    bad = [n for n, w in enumerate(ws) if float(torch.linalg.det(w)) <= 0]
    if bad:
        dets = ", ".join(f"{float(torch.linalg.det(ws[n])):.3g}" for n in bad)
        raise NotLiftableError(
            f"layers {bad} have det w̄_n <= 0 ({dets}); every Wilson line has det > 0, so this "
            "network is the discretization of no linear neural ODE."
        )
    augs = [
        torch.cat([torch.cat([w, b[:, None]], 1), torch.eye(d + 1, dtype=dtype)[-1:]])
        for w, b in zip(ws, bs)
    ]
    logs = [principal_log(A) for A in augs]
    if all(L is not None for L in logs):
        gens = torch.stack(logs) / (T / N)
    else:
        h = T / (2 * N)  # every layer in two halves, so that the pieces stay equal
        halves = []
        for n, L in enumerate(logs):
            if L is not None:
                halves += [L / (2 * h), L / (2 * h)]
                continue
            log_p, log_q = generator_pieces(ws[n])
            first = torch.zeros(d + 1, d + 1, dtype=dtype)
            first[:d, :d] = log_p
            # exp([[log Q, β], [0, 0]]) has top right φ(log Q) β; φ is invertible because the
            # eigenvalues of log Q lie in i(−π, π].
            big = torch.zeros(2 * d, 2 * d, dtype=dtype)
            big[:d, :d], big[:d, d:] = log_q, torch.eye(d, dtype=dtype)
            phi = torch.linalg.matrix_exp(big)[:d, d:]
            second = torch.zeros(d + 1, d + 1, dtype=dtype)
            second[:d, :d], second[:d, d] = log_q, torch.linalg.solve(phi, bs[n])
            halves += [first / h, second / h]
        gens = torch.stack(halves)
    w = PiecewiseConstant(gens[:, :d, :d].contiguous(), T)
    b = PiecewiseConstant(gens[:, :d, d].contiguous(), T)
    return LinearNODE(w, b, T)
