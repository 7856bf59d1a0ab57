"""Speed of discovery and certification, against the targets of the discovery issue.

1. `gaugenet.symmetries` on all-MiniLM-L6-v2 (weights only, loaded beforehand): < 10 s.
2. Exact `functional_dimension` of a ReLU MLP with about 5k parameters: < 30 s.
3. The matrix-free certificate on that MLP agrees with the exact one (same `unexplained`,
   `sigma_min` against the SVD of the Jacobian restricted to the complement of the orbit).
4. The matrix-free certificate of a ReLU MLP with about 100k parameters: < 120 s.

All on `--threads` CPU threads (default 2), float64 for the ranks.

    .venv/bin/python benchmarks/discovery.py [--threads 2] [--skip-minilm] [--skip-exact]
        [--max-iter 300] [--out FILE.md]
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


def bench_exact(widths: list[int]) -> tuple[list[dict[str, object]], nn.Module, torch.Tensor]:
    model = mlp(widths, 0)
    x = inputs_for(model, widths[0], widths[-1], 1)
    n_params = sum(p.numel() for p in model.parameters())
    group = gaugenet.symmetries(model, x)
    exact, secs = timed(lambda: gaugenet.certify(model, x, group=group, method="exact"))
    rows = [
        {
            "what": f"exact functional_dimension, MLP {widths} ({n_params} params, "
            f"{x.shape[0]} inputs)",
            "seconds": secs,
            "target": 30.0,
            "detail": f"rank {exact.functional_dimension}, symmetry dim {exact.symmetry_dim}, "
            f"unexplained {exact.unexplained}, gap {exact.gap:.1e}",
        }
    ]
    mf, secs = timed(lambda: gaugenet.certify(model, x, group=group, method="matrix-free"))
    # the reference: smallest singular value of J on the orthogonal complement of the orbit
    t = group.tangent(model)
    q, _ = torch.linalg.qr(t.T, mode="complete")
    ref = float(torch.linalg.svdvals(jacobian(model, x) @ q[:, t.shape[0] :])[-1])
    agree = mf.unexplained == exact.unexplained
    rows.append(
        {
            "what": "matrix-free certificate, same MLP",
            "seconds": secs,
            "target": None,
            "detail": f"unexplained {mf.unexplained} (exact {exact.unexplained}, "
            f"{'agree' if agree else 'DISAGREE'}, converged {mf.converged}); "
            f"sigma_min {mf.sigma_min:.4e} vs SVD "
            f"{ref:.4e} (rel. diff {abs(mf.sigma_min - ref) / ref:.1e})",
        }
    )
    return rows, model, x


def bench_matrix_free(widths: list[int], max_iter: int) -> dict[str, object]:
    model = mlp(widths, 2)
    x = inputs_for(model, widths[0], widths[-1], 3)
    n_params = sum(p.numel() for p in model.parameters())

    def run():
        group = gaugenet.symmetries(model, x)
        return group, matrix_free_certificate(model, x, group, max_iter=max_iter)

    (group, res), secs = timed(run)
    return {
        "what": f"matrix-free certificate, MLP {widths} ({n_params} params, {x.shape[0]} inputs)",
        "seconds": secs,
        "target": 120.0,
        "detail": f"symmetry dim {group.dim}, orbit rank {res.orbit_rank}, sigma_min "
        f"{res.sigma_min:.3e}, sigma_max {res.sigma_max:.3e}, ratio "
        f"{res.sigma_min / res.sigma_max:.1e}, {res.iterations} Lanczos steps, "
        f"Ritz residual {res.residual:.1e} (converged: {res.residual < res.sigma_min**2})",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-exact", action="store_true", help="skip the 5k-parameter MLP")
    ap.add_argument("--skip-large", action="store_true", help="skip the 100k-parameter MLP")
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [] if args.skip_minilm else [bench_minilm()]
    if not args.skip_exact:
        rows += bench_exact([20, 64, 48, 10])[0]
    if not args.skip_large:
        rows.append(bench_matrix_free([64, 256, 256, 64], args.max_iter))
    lines = [
        f"# discovery benchmark ({args.threads} threads, torch {torch.__version__})",
        "",
        "| what | seconds | target | met | detail |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        tgt = r["target"]
        met = "" if tgt is None else ("yes" if r["seconds"] < tgt else "NO")
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
