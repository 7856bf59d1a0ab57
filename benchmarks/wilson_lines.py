"""Work-precision benchmark of Wilson lines: `wilson_line` against general and Magnus ODE solvers.

The Wilson line of `w(t) = A₀ + sin(3t) A₁ + cos(5t) A₂` (float64, `A_i` Gaussian over `√d`;
`w` evaluates any number of times as one product of the basis values with the stacked
`A_i`, and every torch method calls the same `w`) is computed

- **single**: over `[0, 1]`;
- **batched**: over the `N = 64` intervals `[k/64, (k+1)/64]` (as `LinearNODE.discretize(64)`
  needs them). `wilson_line` takes them as one batch; torchdiffeq and torch-linode integrate
  all of them at once as one batched state in the normalized time `σ ∈ [0, 1]`
  (`t = t0 + σ (t1 - t0)`); scipy solves them one after another.

Methods: `wilson_line` (`rtol`, default method: Magnus6 below `d = 64` and for intervals
short enough for one step with its embedded check, the batched RK8 otherwise), torchdiffeq
`dopri5` and `dopri8`, scipy `solve_ivp(method="DOP853")`, and torch-linode's Magnus-6
(`odeint(method="magnus", order=6)`), each over a sweep of tolerances. Each run's relative
error (max-abs, against fixed-step Magnus6 with 1024 steps per unit time, itself compared
with DOP853 at `1e-13`) is put beside its time; the time each method needs for a relative
error `1e-6`, `1e-10`, `1e-12` is interpolated log-log between the runs that bracket it
(`≤`: the fastest run already below it; `—`: no run reached it within the time cap). Times
are CPU time of the process (single-threaded, so the work done; other processes on a shared
machine disturb it far less than wall time), each the median of `--repeats` rounds taken
round-robin over the methods so that load hits all of them alike (a fast run is repeated
within a round to last about 20 ms).

The floor column is the arithmetic of `wilson_line`'s own run: the `d × d` products it
performs (counted with a dispatch mode, in units of one `d × d` by `d × d` product; RK8's
single-line stages and single-line Magnus steps on numpy's BLAS counted on the torch path,
which takes the same steps)
times the time of one product, the faster of one inside torch's batched product and numpy's
single product; anything else it spends (elementwise kernels, the field, Python) only adds
to it.

Run: `.venv/bin/python benchmarks/wilson_lines.py [--quick] [--dims 16 64 256]
[--threads 1] [--kinds single batched] [--methods DOP853 ...] [--out table.md]`.
`--quick` (a couple of minutes): d = 16, 64, three repeats, fewer tolerances. `--methods`:
only these peers beside `wilson_line` (the table then compares with them alone).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # numpy's BLAS too: one thread unless asked
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch.utils._python_dispatch import TorchDispatchMode
from torchdiffeq import odeint

from gaugenet.ode import _magnus_steps, _rk, wilson_line

try:
    from torch_linode.solvers import odeint as linode_odeint
except ImportError:  # the dev extra installs it
    linode_odeint = None

F64 = torch.float64
TARGETS = (1e-6, 1e-10, 1e-12)
N_BATCH = 64
METHODS = ("wilson_line", "dopri5", "dopri8", "DOP853", "linode-magnus6")


def field(d: int, seed: int = 0):
    """The coefficient matrices `A` and `w`, vectorized over times as one product of the
    basis `(1, sin 3t, cos 5t)` with the stacked `A`."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(3, d, d, dtype=F64, generator=gen) / math.sqrt(d)
    flat = A.reshape(3, d * d)

    def w(t: torch.Tensor) -> torch.Tensor:
        basis = torch.stack([torch.ones_like(t), torch.sin(3 * t), torch.cos(5 * t)], dim=-1)
        return (basis @ flat).unflatten(-1, (d, d))

    return A, w


def intervals(batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if batched:
        edges = torch.linspace(0.0, 1.0, N_BATCH + 1, dtype=F64)
        return edges[1:], edges[:-1]
    return torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)


def solvers(d: int, batched: bool, w, A: torch.Tensor) -> dict[str, Callable[[float], np.ndarray]]:
    """Each method as `tol -> lines (B, d, d)`."""
    t1, t0 = intervals(batched)
    L = t1 - t0
    B = t1.shape[0]
    eye = torch.eye(d, dtype=F64).expand(B, d, d).contiguous()
    An = A.numpy()

    def normalized(sigma: torch.Tensor) -> torch.Tensor:
        """`L w(t0 + σ L)` for every interval: `(B, *σ.shape, d, d)`."""
        s = sigma.reshape(-1)
        times = t0[:, None] + s[None, :] * L[:, None]
        out = w(times.reshape(-1)).reshape(B, s.shape[0], d, d) * L[:, None, None, None]
        return out.reshape(B, *sigma.shape, d, d)

    def ours(tol: float) -> np.ndarray:
        return wilson_line(w, t1, t0, rtol=tol).numpy()

    def tde(method: str) -> Callable[[float], np.ndarray]:
        s01 = torch.tensor([0.0, 1.0], dtype=F64)

        def run(tol: float) -> np.ndarray:
            # step_t ends the last step at σ = 1: the output is a step value, not interpolated.
            out = odeint(
                lambda s, y: normalized(s) @ y,
                eye,
                s01,
                method=method,
                rtol=tol,
                atol=tol,
                options={"step_t": s01[1:]},
            )
            return out[-1].numpy()

        return run

    def dop853(tol: float) -> np.ndarray:
        out = []
        for a, b in zip(t0.tolist(), t1.tolist()):

            def rhs(t, y):
                M = An[0] + np.sin(3 * t) * An[1] + np.cos(5 * t) * An[2]
                return (M @ y.reshape(d, d)).ravel()

            sol = solve_ivp(rhs, (a, b), np.eye(d).ravel(), method="DOP853", rtol=tol, atol=tol)
            out.append(sol.y[:, -1].reshape(d, d))
        return np.stack(out)

    def linode(tol: float) -> np.ndarray:
        def system(sigma, params=None):
            sigma = torch.as_tensor(sigma, dtype=F64)
            return normalized(sigma).unsqueeze(1)  # (B, 1, *σ, d, d): the d columns batch

        s01 = torch.tensor([0.0, 1.0], dtype=F64)
        Y = linode_odeint(system, eye, s01, method="magnus", order=6, rtol=tol, atol=tol)
        return Y[..., -1, :].mT.numpy()  # rows of y are the columns of W

    found = {"wilson_line": ours, "dopri5": tde("dopri5"), "dopri8": tde("dopri8")}
    found["DOP853"] = dop853
    if linode_odeint is not None:
        found["linode-magnus6"] = linode
    return found


def tolerances(name: str, quick: bool) -> list[float]:
    if name == "wilson_line":
        grid = [1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13]
    else:
        grid = [1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13]
    return grid[::2] if quick else grid


def reference(w, d: int, batched: bool) -> np.ndarray:
    t1, t0 = intervals(batched)
    steps = max(1, round(1024 / N_BATCH)) if batched else (1024 if d < 256 else 256)
    # In chunks of intervals: the whole batch at once would pass wilson_line's memory cap.
    parts = [
        wilson_line(w, t1[i : i + 4], t0[i : i + 4], steps=steps) for i in range(0, len(t1), 4)
    ]
    return torch.cat(parts).numpy()


class ProductCount(TorchDispatchMode):
    """Counts matrix-product flops of the ops it sees, in units of one `d × d × d` product."""

    def __init__(self, d: int):
        super().__init__()
        self.d, self.flops = d, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0].rstrip("_")  # in-place variants (baddbmm_) too
        if name in ("mm", "bmm", "addmm", "baddbmm", "matmul"):
            a, b = (args[0], args[1]) if name in ("mm", "bmm", "matmul") else (args[1], args[2])
            inner = a.shape[-1]
            self.flops += out.numel() * inner
        return out


def products(fn: Callable[[], object], d: int) -> float:
    """`d × d` products of `fn`'s run. RK8's single-line stages and single-line Magnus steps
    on numpy's BLAS are counted on the torch path (the same steps: numpy's calls pass no
    dispatch mode)."""
    original, original_steps = _rk.numpy_stages, _magnus_steps.numpy_steps
    _rk.numpy_stages = lambda K0: False
    _magnus_steps.numpy_steps = lambda A, h, method: False
    try:
        with ProductCount(d) as counter:
            fn()
    finally:
        _rk.numpy_stages, _magnus_steps.numpy_steps = original, original_steps
    return counter.flops / d**3


def product_seconds(d: int, repeats: int) -> float:
    """Time of one `d × d` float64 product (median): the faster of one inside torch's batched
    product and numpy's single product (RK8's single line may run on either)."""
    batch = max(2, min(64, 4096 // d))
    a = torch.randn(batch, d, d, dtype=F64)
    an, out = a[0].numpy(), np.empty((d, d))
    once = timed(lambda: a @ a, 1e-3)
    batched = statistics.median(timed(lambda: a @ a, once) for _ in range(repeats * 3)) / batch
    once = timed(lambda: np.dot(an, an, out=out), 1e-3)
    single = statistics.median(timed(lambda: np.dot(an, an, out=out), once) for _ in range(9))
    return min(batched, single)


def clock() -> float:
    """CPU time of this process: with one thread it is the work done, and other processes
    on a shared machine change it far less than they change wall time."""
    return time.process_time()


def timed(fn: Callable[[], object], once: float) -> float:
    """One timing of `fn`: the mean of enough calls to last about 20 ms (at most 10)."""
    k = max(1, min(10, math.ceil(0.02 / max(once, 1e-6))))
    start = clock()
    for _ in range(k):
        fn()
    return (clock() - start) / k


def sweep(
    d: int, batched: bool, repeats: int, quick: bool, cap: float, only: list[str] | None = None
):
    """`{method: [(tol, error, seconds)]}`: round-robin repeats, median times; a method's
    tighter tolerances are skipped once one of its runs takes longer than `cap` seconds.
    `only`: the methods to run (default all; `wilson_line` always)."""
    A, w = field(d)
    ref = reference(w, d, batched)
    scale = np.abs(ref).max(axis=(-2, -1))
    fns = solvers(d, batched, w, A)
    if only:
        fns = {n: f for n, f in fns.items() if n == "wilson_line" or n in only}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in fns}
    for name, fn in fns.items():
        for tol in tolerances(name, quick):
            fn(tol)  # warm-up
            start = clock()
            out = fn(tol)
            once = clock() - start
            err = float((np.abs(out - ref).max(axis=(-2, -1)) / scale).max())
            results[name].append((tol, err, once))
            if once > cap:
                break
    # Round-robin repeats: every method meets the same load.
    timings = {(n, i): [s] for n, rows in results.items() for i, (_, _, s) in enumerate(rows)}
    for _ in range(repeats - 1):
        for name, rows in results.items():
            for i, (tol, _, s) in enumerate(rows):
                if s > cap / 4:
                    continue
                timings[(name, i)].append(timed(lambda f=fns[name], t=tol: f(t), s))
    for name, rows in results.items():
        results[name] = [
            (tol, err, statistics.median(timings[(name, i)]))
            for i, (tol, err, _) in enumerate(rows)
        ]
    return results, ref, w


def time_at(rows: list[tuple[float, float, float]], target: float) -> tuple[float, str]:
    """Log-log interpolated time for relative error `target`: `(seconds, mark)`."""
    pts = sorted((e, s) for _, e, s in rows if e > 0)
    for (e1, s1), (e2, s2) in zip(pts, pts[1:]):
        if e1 <= target <= e2:
            f = (math.log(target) - math.log(e1)) / (math.log(e2) - math.log(e1))
            return math.exp(math.log(s1) + f * (math.log(s2) - math.log(s1))), ""
    below = [s for e, s in pts if e <= target]
    return (min(below), "≤") if below else (math.nan, "—")


def floor_at(rows, target: float, d: int, w, batched: bool, product: float) -> float:
    """Arithmetic floor of `wilson_line` at `target`: the products of the run at the loosest
    tolerance that reaches it, times one product's time."""
    ok = [tol for tol, e, _ in rows if e <= target]
    if not ok:
        return math.nan
    t1, t0 = intervals(batched)
    return products(lambda: wilson_line(w, t1, t0, rtol=max(ok)), d) * product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cap", type=float, default=20.0, help="seconds per run before skipping")
    parser.add_argument("--quick", action="store_true", help="d = 16, 64, fewer tolerances")
    parser.add_argument("--kinds", nargs="+", default=["single", "batched"])
    parser.add_argument("--out", type=str, default=None, help="write the markdown tables here")
    parser.add_argument(
        "--methods", nargs="+", default=None, choices=METHODS[1:], help="peers to run (all)"
    )
    args = parser.parse_args()
    dims = args.dims or ([16, 64] if args.quick else [16, 64, 256])
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    lines = [
        f"# Wilson lines: time [ms] to a relative error (float64, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), numpy BLAS {os.environ['OMP_NUM_THREADS']}, "
        f"{platform.processor() or platform.machine()}, CPU time of the process, median of "
        f"{repeats})",
        "",
    ]
    if linode_odeint is None:
        lines += ["torch-linode is not installed: its column is missing.", ""]
    verdicts = []
    for batched in [kind == "batched" for kind in args.kinds]:
        for d in dims:
            results, _, w = sweep(d, batched, repeats, args.quick, args.cap, args.methods)
            product = product_seconds(d, repeats)
            kind = f"batched N = {N_BATCH}" if batched else "single"
            names = [n for n in METHODS if n in results]
            lines += [
                f"## d = {d}, {kind}",
                "",
                "| rel. error | "
                + " | ".join(names)
                + " | floor | ours / floor | best peer / ours |",
                "|---" * (len(names) + 4) + "|",
            ]
            for target in TARGETS:
                cells, times = [], {}
                for name in names:
                    t, mark = time_at(results[name], target)
                    times[name] = t
                    cells.append(f"{mark}{1e3 * t:.2f}" if math.isfinite(t) else mark)
                floor = floor_at(results["wilson_line"], target, d, w, batched, product)
                ours = times["wilson_line"]
                peers = [t for n, t in times.items() if n != "wilson_line" and math.isfinite(t)]
                best = min(peers) if peers else math.nan
                lines.append(
                    f"| {target:.0e} | "
                    + " | ".join(cells)
                    + f" | {1e3 * floor:.2f} | {ours / floor:.2f} | {best / ours:.1f}x |"
                )
                verdicts.append((d, kind, target, ours, times, floor))
            lines += ["", "runs (tolerance: error, ms):", ""]
            for name in names:
                runs = ", ".join(
                    f"{tol:.0e}: {e:.1e}, {1e3 * s:.2f}" for tol, e, s in results[name]
                )
                lines.append(f"- {name}: {runs}")
            lines.append("")
            print("\n".join(lines[-(len(names) + 12) :]), flush=True)
    lines += ["## targets", ""]
    for d, kind, target, ours, times, floor in verdicts:
        peers = {n: t for n, t in times.items() if n != "wilson_line" and math.isfinite(t)}
        fastest = all(ours <= t for t in peers.values())
        notes = [f"fastest: {'yes' if fastest else 'no'}", f"floor x{ours / floor:.2f}"]
        if "dopri5" in peers and kind == "single" and d in (16, 64):
            notes.append(f"dopri5 / ours {peers['dopri5'] / ours:.1f}x (>= 20)")
        if kind != "single" and "DOP853" in peers:
            notes.append(f"DOP853 x{N_BATCH} / ours {peers['DOP853'] / ours:.1f}x (>= 10)")
        lines.append(f"- d = {d}, {kind}, {target:.0e}: " + ", ".join(notes))
    text = "\n".join(lines)
    print("\n".join(lines[-len(verdicts) - 2 :]))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
