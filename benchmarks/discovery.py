"""Speed of discovery and certification, against the targets of the discovery issue.

1. `gaugenet.symmetries` on all-MiniLM-L6-v2 (weights only, loaded beforehand): < 10 s.
2. Exact `functional_dimension` of a ReLU MLP with about 5k parameters: < 30 s.
3. The matrix-free certificate on that MLP agrees with the exact one: same `unexplained`,
   converged, and `sigma_min` within 1e-3 relative of the smallest singular value of the
   Jacobian restricted to the complement of the orbit (dense SVD, not timed).
4. The matrix-free certificate of a ReLU MLP with about 100k parameters, `symmetries`
   included: converged, in < 120 s.

All on `--threads` CPU threads (default 2), float64 for the ranks. A row is met when it is
under its time target and its condition (agreement, convergence) holds.

    .venv/bin/python benchmarks/discovery.py [--threads 2] [--skip-minilm] [--skip-exact]
        [--skip-large] [--max-iter 2000] [--tol 0.01] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import gaugenet
from gaugenet.certify import matrix_free_certificate
from gaugenet.certify._functional_dimension import jacobian


def mlp(widths: list[int], seed: int) -> nn.Module:
    """A float64 ReLU MLP with zero-mean weights of unit gain (no dead, always-active or
    rarely active units on standard normal inputs)."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=torch.float64) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=gen, dtype=torch.float64))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    # biases at minus the median pre-activation: every unit active on about half the inputs
    # (a unit active on fewer inputs than its fan-in has redundant incoming weights)
    x = torch.randn(2000, widths[0], generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.copy_(-F.linear(x, m.weight).median(0).values)
            x = m(x)
    return model


def inputs_for(model: nn.Module, d_in: int, d_out: int, seed: int) -> torch.Tensor:
    """Enough inputs that the outputs outnumber the parameters by 20%."""
    n_params = sum(p.numel() for p in model.parameters())
    n = int(1.2 * n_params / d_out) + 1
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - start
    print(f"  ... {getattr(fn, '__qualname__', fn)}: {secs:.2f} s", flush=True)
    return out, secs


def bench_minilm() -> dict[str, object]:
    from gaugenet.nets import minilm

    model = minilm()
    group, secs = timed(lambda: gaugenet.symmetries(model))
    return {
        "what": "symmetries(all-MiniLM-L6-v2)",
        "seconds": secs,
        "target": 10.0,
        "detail": f"{len(group.factors)} factors, dim {group.dim}",
    }


def bench_exact(
    widths: list[int], max_iter: int, tol: float
) -> tuple[list[dict[str, object]], nn.Module, torch.Tensor]:
    model = mlp(widths, 0)
    x = inputs_for(model, widths[0], widths[-1], 1)
    n_params = sum(p.numel() for p in model.parameters())
    group = gaugenet.symmetries(model, x)
    exact, secs = timed(lambda: gaugenet.certify(model, x, group=group, method="exact"))
    fd = gaugenet.functional_dimension(model, x)  # for the algorithm's name (not timed)
    rows = [
        {
            "what": f"exact functional_dimension, MLP {widths} ({n_params} params, "
            f"{x.shape[0]} inputs)",
            "seconds": secs,
            "target": 30.0,
            "ok": exact.unexplained == 0,
            "detail": f"rank {exact.functional_dimension}, symmetry dim {exact.symmetry_dim}, "
            f"unexplained {exact.unexplained}, gap {exact.gap:.1e} "
            f"(sigma {fd.sigma_last:.3e} kept, {fd.sigma_next:.1e} dropped; "
            f"{fd.algorithm} singular values, float64)",
        }
    ]
    mf, secs = timed(
        lambda: gaugenet.certify(
            model, x, group=group, method="matrix-free", max_iter=max_iter, tol=tol
        )
    )
    # the reference: smallest singular value of J on the orthogonal complement of the orbit
    t = group.tangent(model)
    q, _ = torch.linalg.qr(t.T, mode="complete")
    ref = float(torch.linalg.svdvals(jacobian(model, x) @ q[:, t.shape[0] :])[-1])
    rel = abs(mf.sigma_min - ref) / ref
    agree = mf.unexplained == exact.unexplained and mf.converged and rel <= 1e-3
    rows.append(
        {
            "what": "matrix-free certificate, same MLP (agrees: same unexplained, converged, "
            "sigma_min within 1e-3)",
            "seconds": secs,
            "target": None,
            "ok": agree,
            "detail": f"unexplained {mf.unexplained} (exact {exact.unexplained}), converged "
            f"{mf.converged}; sigma_min {mf.sigma_min:.6e} vs SVD {ref:.6e} (rel. diff "
            f"{rel:.1e}): {'agree' if agree else 'DISAGREE'}",
        }
    )
    return rows, model, x


def bench_matrix_free(widths: list[int], max_iter: int, tol: float) -> dict[str, object]:
    model = mlp(widths, 2)
    x = inputs_for(model, widths[0], widths[-1], 3)
    n_params = sum(p.numel() for p in model.parameters())

    def run():
        start = time.perf_counter()
        group = gaugenet.symmetries(model, x)
        sym = time.perf_counter() - start
        return group, sym, matrix_free_certificate(model, x, group, max_iter=max_iter, tol=tol)

    (group, sym, res), secs = timed(run)
    theta = res.sigma_min**2
    return {
        "what": f"matrix-free certificate incl. symmetries, MLP {widths} ({n_params} params, "
        f"{x.shape[0]} inputs)",
        "seconds": secs,
        "target": 120.0,
        "ok": res.converged,
        "detail": f"symmetries {sym:.1f} s, dim {group.dim}, orbit rank {res.orbit_rank}; "
        f"sigma_min {res.sigma_min:.4e} (upper bound), sigma_max {res.sigma_max:.3e}, ratio "
        f"{res.sigma_min / res.sigma_max:.1e}; {res.iterations} products with JᵀJ "
        f"({res.preconditioner}-preconditioned Davidson); residual {res.residual:.1e} = "
        f"{res.residual / theta:.1e} of sigma_min² (tol {res.tol:g}): converged {res.converged}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-exact", action="store_true", help="skip the 5k-parameter MLP")
    ap.add_argument("--skip-large", action="store_true", help="skip the 100k-parameter MLP")
    ap.add_argument("--max-iter", type=int, default=2000, help="products with JᵀJ")
    ap.add_argument("--tol", type=float, default=1e-2, help="convergence: residual / sigma_min²")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [] if args.skip_minilm else [bench_minilm()]
    if not args.skip_exact:
        rows += bench_exact([20, 64, 48, 10], args.max_iter, args.tol)[0]
    if not args.skip_large:
        rows.append(bench_matrix_free([64, 256, 256, 64], args.max_iter, args.tol))
    lines = [
        f"# discovery benchmark ({args.threads} threads, torch {torch.__version__})",
        "",
        "| what | seconds | target | met | detail |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        tgt, ok = r["target"], r.get("ok", True)
        met = "yes" if ok and (tgt is None or r["seconds"] < tgt) else "NO"
        lines.append(
            f"| {r['what']} | {r['seconds']:.2f} | {'' if tgt is None else tgt} | {met} "
            f"| {r['detail']} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
