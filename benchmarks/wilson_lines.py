"""Work-precision benchmark of Wilson lines: Magnus integrators against general ODE solvers.

The Wilson line `W_{1:0}` of `w(t) = A₀ + sin(3t) A₁ + cos(5t) A₂` (float64, `A_i` Gaussian
over `√d`; `w` evaluates any number of times as one product of the basis values with the
stacked `A_i`, and every method calls the same `w`) is computed by

- `wilson_line` (Magnus6, Magnus4) at a range of `rtol` (step-count search, then Richardson
  extrapolation), and Magnus6 at fixed step counts (`magnus6-steps`),
- torchdiffeq `dopri5` at `rtol = atol = 1e-4 … 1e-10` and fixed-step `rk4`, on the matrix ODE
  `Ẇ = w(t) W`,
- scipy `solve_ivp(method="DOP853")`,

and each run's relative error (max-abs, against a 2048-step Magnus6 reference that is also
compared with DOP853 at `1e-13`) is put beside its wall time. The time each method needs for
relative error `1e-10` is interpolated log-log and divided by Magnus6's. Times are the
fastest of `--repeats` runs, single-threaded by default (`--threads`).

Each dimension also gets Magnus6's arithmetic floor: the steps it needs for `1e-10` (from
the fixed-step rows and its order) times the 12 `d × d` products of one step (six for the
three commutators, five for the exponential, one for the ordered product), each timed as
part of a batched product on this machine. Time spent on anything else only adds to it, so
`dopri5`'s time over the floor bounds the speed-up any implementation of the method can
reach here (one Richardson extrapolation, as the `rtol` path does, lowers the floor by at
most about 15%: 22 steps instead of 26 at d = 64).

Run: `.venv/bin/python benchmarks/wilson_lines.py [--dims 16 64] [--threads 2] [--keep-heap]
[--out table.md]`. `--keep-heap` keeps freed memory in the process, as a caching allocator
would; without it, glibc returns the batched temporaries to the system after every call and
each call pays page faults for them again (on this virtual machine about 1-3 ms at d = 64).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torchdiffeq import odeint

from gaugenet.ode import Magnus4, Magnus6, wilson_line

TARGET = 1e-10
#: `d × d` products of one Magnus6 step: 3 commutators, the degree-12 exponential, the product
PRODUCTS_PER_STEP = 12
#: the issue's target: at least this many times faster than dopri5 at `TARGET`
SPEEDUP_TARGET = 20.0


def field(d: int, seed: int = 0):
    """The coefficient matrices `A` and `w`, vectorized over times as one product of the
    basis `(1, sin 3t, cos 5t)` with the stacked `A` (every method calls the same `w`)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(3, d, d, dtype=torch.float64, generator=gen) / math.sqrt(d)
    flat = A.reshape(3, d * d)

    def w(t: torch.Tensor) -> torch.Tensor:
        basis = torch.stack([torch.ones_like(t), torch.sin(3 * t), torch.cos(5 * t)], dim=-1)
        return (basis @ flat).unflatten(-1, (d, d))

    return A, w


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """The fastest of `repeats` runs (the least disturbed by other load) and the output."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def runs(d: int, repeats: int) -> tuple[list[tuple[str, str, float, float]], float]:
    A, w = field(d)
    eye = torch.eye(d, dtype=torch.float64)
    ref = wilson_line(w, 1.0, 0.0, steps=2048).numpy()
    An = A.numpy()

    def rhs_np(t, y):
        M = An[0] + np.sin(3 * t) * An[1] + np.cos(5 * t) * An[2]
        return (M @ y.reshape(d, d)).ravel()

    def rhs_torch(t, y):
        return w(t.reshape(1))[0] @ y

    check = solve_ivp(rhs_np, (0, 1), np.eye(d).ravel(), method="DOP853", rtol=1e-13, atol=1e-13)
    ref_gap = float(np.abs(check.y[:, -1].reshape(d, d) - ref).max() / np.abs(ref).max())
    t01 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    cases: list[tuple[str, str, Callable[[], np.ndarray]]] = []
    for rtol in (1e-4, 1e-6, 1e-8, 1e-10, 1e-12):
        for name, method in (("magnus6", Magnus6()), ("magnus4", Magnus4())):
            cases.append(
                (
                    name,
                    f"rtol={rtol:.0e}",
                    lambda r=rtol, m=method: wilson_line(w, 1.0, 0.0, rtol=r, method=m).numpy(),
                )
            )
    for n in (4, 8, 12, 16, 20, 24, 32, 48):
        cases.append(
            (
                "magnus6-steps",
                f"steps={n}",
                lambda n=n: wilson_line(w, 1.0, 0.0, steps=n).numpy(),
            )
        )
    for rtol in (1e-4, 1e-6, 1e-8, 1e-9, 1e-10, 1e-11):
        # step_t ends the last step at t = 1, so the output is a step value, not interpolated.
        cases.append(
            (
                "dopri5",
                f"rtol={rtol:.0e}",
                lambda r=rtol: odeint(
                    rhs_torch,
                    eye,
                    t01,
                    method="dopri5",
                    rtol=r,
                    atol=r,
                    options={"step_t": t01[1:]},
                )[-1].numpy(),
            )
        )
    for n in (16, 64, 256, 512):
        cases.append(
            (
                "rk4",
                f"steps={n}",
                lambda n=n: odeint(
                    rhs_torch, eye, t01, method="rk4", options={"step_size": 1.0 / n}
                )[-1].numpy(),
            )
        )
    for rtol in (1e-4, 1e-6, 1e-8, 1e-10, 1e-12):
        cases.append(
            (
                "DOP853",
                f"rtol={rtol:.0e}",
                lambda r=rtol: (
                    solve_ivp(rhs_np, (0, 1), np.eye(d).ravel(), method="DOP853", rtol=r, atol=r)
                    .y[:, -1]
                    .reshape(d, d)
                ),
            )
        )
    rows = []
    for name, setting, fn in cases:
        seconds, out = timed(fn, repeats)
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        rows.append((name, setting, err, seconds))
    return rows, ref_gap


def product_seconds(d: int, batch: int = 24, repeats: int = 50) -> float:
    """Time of one `d × d` float64 product inside a batched product of `batch` of them."""
    a = torch.randn(batch, d, d, dtype=torch.float64)
    seconds, _ = timed(lambda: (a @ a).numpy(), repeats)
    return seconds / batch


def steps_at(rows, order: int = 6, target: float = TARGET) -> float:
    """Fixed Magnus steps for `target`: from the step count whose error is nearest to it,
    scaled by the method's order (`error ∝ n^-order`)."""
    pts = [(int(s.split("=")[1]), e) for n, s, e, _ in rows if n == "magnus6-steps" and e > 0]
    n, e = min(pts, key=lambda p: abs(math.log(p[1] / target)))
    return n * (e / target) ** (1.0 / order)


def time_at(rows, name: str, target: float = TARGET) -> float:
    """Log-log interpolation of time against error at `target` (nan outside the range)."""
    pts = sorted((e, s) for n, _, e, s in rows if n == name and e > 0)
    for (e1, s1), (e2, s2) in zip(pts, pts[1:]):
        if e1 <= target <= e2:
            f = (math.log(target) - math.log(e1)) / (math.log(e2) - math.log(e1))
            return math.exp(math.log(s1) + f * (math.log(s2) - math.log(s1)))
    return math.nan


def keep_heap() -> bool:
    """Ask glibc to keep freed memory (no trimming, large blocks from the heap), as a caching
    allocator such as jemalloc or tcmalloc would: then a batched method does not pay page
    faults for its large temporaries on every call. It applies to every method in this
    process alike. Returns whether the setting took (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)
    return bool(ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=str, default=None, help="write a markdown table here")
    parser.add_argument(
        "--keep-heap",
        action="store_true",
        help="keep freed memory in the process (glibc mallopt), as a caching allocator does",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heap = "kept (mallopt)" if args.keep_heap and keep_heap() else "glibc default"
    lines = [
        f"# Wilson lines: work-precision (float64, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, heap {heap})",
        "",
    ]
    for d in args.dims:
        rows, ref_gap = runs(d, args.repeats)
        lines += [
            f"## d = {d}",
            "",
            f"reference vs DOP853 at 1e-13: {ref_gap:.1e}",
            "",
            "| method | setting | rel. error | time [ms] |",
            "|---|---|---|---|",
        ]
        lines += [f"| {n} | {s} | {e:.2e} | {1e3 * t:.2f} |" for n, s, e, t in rows]
        base = time_at(rows, "magnus6")
        lines += [
            "",
            f"time at relative error {TARGET:.0e} (log-log interpolated), and its "
            "ratio to magnus6's (with `rtol`):",
            "",
            "| method | time [ms] | ratio |",
            "|---|---|---|",
        ]
        for name in ("magnus6", "magnus6-steps", "magnus4", "dopri5", "rk4", "DOP853"):
            t = time_at(rows, name)
            lines.append(f"| {name} | {1e3 * t:.2f} | {t / base:.1f}x |")
        dopri = time_at(rows, "dopri5")
        steps, product = steps_at(rows), product_seconds(d)
        floor = steps * PRODUCTS_PER_STEP * product
        lines.append(
            f"\narithmetic floor of magnus6 at {TARGET:.0e}: {steps:.1f} steps x "
            f"{PRODUCTS_PER_STEP} products x {1e6 * product:.1f} us = {1e3 * floor:.2f} ms; "
            f"dopri5 / floor = {dopri / floor:.1f} (the most any implementation of the "
            "method reaches here)"
        )
        for name in ("magnus6", "magnus6-steps"):
            ratio = dopri / time_at(rows, name)
            verdict = "met" if ratio >= SPEEDUP_TARGET else "missed"
            lines.append(
                f"\ntarget ({name}): dopri5 / {name} at {TARGET:.0e} = {ratio:.1f} "
                f"(>= {SPEEDUP_TARGET:.0f}: {verdict})"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
