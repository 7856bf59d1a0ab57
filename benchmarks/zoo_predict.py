"""Do canonical weights help weight-space learning? Predict a model's test accuracy from its
weights, on raw, permutation-aligned, canonical and canonical + permutation-aligned weights.

The zoo is `benchmarks/zoo_build.py`'s (built if missing); it is canonicalized with
`gaugenet.zoo.run(..., "canonicalize")` on a local Dask cluster. Alignment is weight
matching (`gaugenet.apply.align_to(..., align="permutation")`) to one reference model: the
one with the highest training accuracy (no test label enters the choice). Predictors, from
scikit-learn: ridge regression on the flattened weights (3 466 features, standardized,
penalty chosen by inner cross-validation) and gradient boosting on per-tensor statistics
(mean, mean |w|, std, norm, 7 quantiles: 66 features). Held-out R² by 5-fold
cross-validation (mean ± standard deviation over the folds), the same folds for all.

    .venv/bin/python benchmarks/zoo_predict.py [--workers 2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import gaugenet.zoo
import zoo_build
from gaugenet import symmetries
from gaugenet.apply import align_to
from gaugenet.apply._models import digits_mlp

KEYS = ("1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias")
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def flat(state: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([state[k].double().reshape(-1) for k in KEYS]).numpy()


def stats(state: dict[str, torch.Tensor]) -> np.ndarray:
    out = []
    for k in KEYS:
        w = state[k].double().reshape(-1)
        q = torch.quantile(w, torch.tensor(QUANTILES, dtype=torch.float64))
        out += [w.mean(), w.abs().mean(), w.std(), w.norm(), *q]
    return torch.stack([torch.as_tensor(v) for v in out]).numpy()


def aligned(states: list[dict], ref: int, group) -> list[dict]:
    """Every model's weights permuted to match model `ref` (weight matching)."""
    x = torch.randn(4, 1, 8, 8)
    models = []
    for s in states:
        m = digits_mlp(zoo_build.HIDDEN)
        m.load_state_dict(s)
        models.append(m.eval())
    return [
        {k: v.detach() for k, v in align_to(models[ref], m, x, align="permutation", group=group)
         .state_dict().items()}
        for m in models
    ]  # fmt: skip


def scores(features: np.ndarray, y: np.ndarray, model: str) -> tuple[float, float]:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model == "ridge":
        est = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15)))
    else:
        est = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=0)
    folds = KFold(5, shuffle=True, random_state=0)
    r2 = cross_val_score(est, features, y, cv=folds, scoring="r2")
    return float(r2.mean()), float(r2.std())


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=zoo_build.DEFAULT_CACHE)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the table as markdown")
    a = ap.parse_args()
    cache = zoo_build.build(a.n, a.cache)
    with (cache / "meta.csv").open() as fh:
        meta = {r["name"]: r for r in csv.DictReader(fh)}
    t0 = time.perf_counter()
    df = gaugenet.zoo.run(
        cache / "models", "canonicalize", out=cache / "results", arch=str(cache / "arch.py:mlp"),
        workers=a.workers, progress=True,
    )  # fmt: skip
    print(f"canonicalized {len(df)} models in {time.perf_counter() - t0:.1f} s "
          f"({df.attrs['skipped']} reused); verdicts {df['verdict'].value_counts().to_dict()}, "
          f"max drift {df['drift'].max():.2e}")  # fmt: skip
    if (df["verdict"] != "ok").any():
        raise SystemExit("some models were not canonicalized; see the table")
    names = [Path(p).name.split(".")[0] for p in df["path"]]
    y = np.array([float(meta[n]["test_acc"]) for n in names])
    ref = int(np.argmax([float(meta[n]["train_acc"]) for n in names]))
    raw = [load_file(p) for p in df["path"]]
    canon = [load_file(p) for p in df["output"]]
    group = symmetries(digits_mlp(zoo_build.HIDDEN), torch.randn(4, 1, 8, 8))
    t0 = time.perf_counter()
    reps = {
        "raw": raw,
        "raw + permutation-aligned": aligned(raw, ref, group),
        "canonical": canon,
        "canonical + permutation-aligned": aligned(canon, ref, group),
    }
    print(f"aligned in {time.perf_counter() - t0:.1f} s to {names[ref]}")
    lines = [
        f"Held-out R² (5-fold cross-validation, mean ± sd) predicting the test accuracy of "
        f"{len(y)} digits MLPs (accuracy {y.min():.2f}–{y.max():.2f}, sd {y.std():.3f}):",
        "",
        "| weights | ridge, flattened weights | gradient boosting, per-tensor statistics |",
        "|---|---|---|",
    ]
    for name, states in reps.items():
        f_flat = np.stack([flat(s) for s in states])
        f_stats = np.stack([stats(s) for s in states])
        r1, s1 = scores(f_flat, y, "ridge")
        r2, s2 = scores(f_stats, y, "gbm")
        lines.append(f"| {name} | {r1:.3f} ± {s1:.3f} | {r2:.3f} ± {s2:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
