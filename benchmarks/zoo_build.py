"""Build a zoo of small digits MLPs that differ in seed, learning rate, epochs, weight decay
and initial scale (so that their test accuracy varies), for weight-space learning.

All models share one architecture, `digits_mlp(32)` (64-32-32-10, ReLU; 3 466 parameters),
so that their weights are comparable. They are trained at once, vectorized over models:
each model's layers are one slice of a stacked tensor, minibatches are drawn in each model's
own seeded order, and AdamW runs with per-model learning rate and weight decay (a model
stops updating after its own number of epochs). About 25 s of CPU time for 600 models.

Writes, under `--cache` (a folder ignored by git): `models/mlp-NNNN.safetensors` (the
state dict of `digits_mlp(32)`), `meta.csv` (hyperparameters, train and test accuracy) and
`arch.py` (the factory to pass as `--arch cache/arch.py:mlp`). Reuses a finished cache.

    .venv/bin/python benchmarks/zoo_build.py [--n 600] [--cache benchmarks/.cache/zoo-digits]
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from gaugenet.apply._models import digits, digits_mlp

HIDDEN = 32
WIDTHS = (64, HIDDEN, HIDDEN, 10)
#: the parameter names of `digits_mlp(HIDDEN)` for the three Linear layers
NAMES = ("1", "3", "5")
DEFAULT_CACHE = Path(__file__).parent / ".cache" / "zoo-digits"
ARCH = "from gaugenet.apply._models import digits_mlp\n\n\ndef mlp():\n    return digits_mlp(32)\n"


def hyperparameters(n: int, seed: int) -> dict[str, Tensor]:
    """Per-model hyperparameters, drawn log-uniformly (epochs uniformly)."""
    g = torch.Generator().manual_seed(seed)

    def log_uniform(lo: float, hi: float) -> Tensor:
        return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(n, generator=g))

    return {
        "seed": torch.randperm(100_000, generator=g)[:n],
        "lr": log_uniform(1e-4, 3e-2),
        "epochs": torch.randint(1, 13, (n,), generator=g),
        "weight_decay": log_uniform(1e-5, 3e-1),
        "init_scale": log_uniform(0.3, 3.0),
    }


def init(hp: dict[str, Tensor]) -> list[Tensor]:
    """PyTorch's default Linear init (uniform in ±1/√fan_in) per model's seed, times its
    initial scale: `[W1 (n, 64, 32), b1 (n, 32), W2, b2, W3, b3]` (weights as `x @ W`)."""
    n = len(hp["seed"])
    params: list[list[Tensor]] = [[] for _ in range(2 * (len(WIDTHS) - 1))]
    for i in range(n):
        g = torch.Generator().manual_seed(int(hp["seed"][i]))
        for k, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
            bound = float(hp["init_scale"][i]) / math.sqrt(a)
            params[2 * k].append((2 * torch.rand(a, b, generator=g) - 1) * bound)
            params[2 * k + 1].append((2 * torch.rand(b, generator=g) - 1) * bound)
    return [torch.stack(p).requires_grad_() for p in params]


def forward(params: list[Tensor], x: Tensor) -> Tensor:
    """Logits `(n, batch, 10)` of every model on its own batch `x` `(n, batch, 64)`."""
    h = x
    for k in range(0, len(params), 2):
        h = torch.baddbmm(params[k + 1].unsqueeze(1), h, params[k])
        if k + 2 < len(params):
            h = h.relu()
    return h


def train(hp: dict[str, Tensor], x: Tensor, y: Tensor, batch: int = 64) -> list[Tensor]:
    """AdamW, vectorized over models; model `i` takes `epochs[i]` epochs of minibatches."""
    params = init(hp)
    n, m = len(hp["seed"]), len(y)
    g = torch.Generator().manual_seed(int(hp["seed"].sum()))
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    b1, b2, eps, step = 0.9, 0.999, 1e-8, 0
    for epoch in range(int(hp["epochs"].max())):
        live = (hp["epochs"] > epoch).float()
        order = torch.rand(n, m, generator=g).argsort(1)
        for idx in order.split(batch, dim=1):
            step += 1
            logits = forward(params, x[idx])
            loss = (
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, 10), y[idx].reshape(-1), reduction="sum"
                )
                / idx.shape[1]
            )  # the sum over models of each model's mean loss
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, gr, (mu, nu) in zip(params, grads, state):
                    shape = (n,) + (1,) * (p.dim() - 1)
                    on, lr = live.view(shape), hp["lr"].view(shape)
                    mu.mul_(b1).add_((1 - b1) * gr)
                    nu.mul_(b2).add_((1 - b2) * gr * gr)
                    upd = (mu / (1 - b1**step)) / ((nu / (1 - b2**step)).sqrt() + eps)
                    p.sub_(on * lr * (upd + hp["weight_decay"].view(shape) * p))
    return [p.detach() for p in params]


def accuracy(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Accuracy of every model on the same data: `(n,)`."""
    logits = forward(params, x.expand(len(params[0]), *x.shape))
    return (logits.argmax(-1) == y).double().mean(1)


def state_dict(params: list[Tensor], i: int) -> dict[str, Tensor]:
    """Model `i` as the state dict of `digits_mlp(HIDDEN)` (Linear weights are `(out, in)`)."""
    out = {}
    for k, name in enumerate(NAMES):
        out[f"{name}.weight"] = params[2 * k][i].T.contiguous()
        out[f"{name}.bias"] = params[2 * k + 1][i].contiguous()
    return out


def build(n: int = 600, cache: Path = DEFAULT_CACHE, seed: int = 0) -> Path:
    """Train and save the zoo (unless `cache` already holds this one); returns `cache`."""
    meta = cache / "meta.csv"
    stamp = f"n={n} seed={seed} hidden={HIDDEN}"
    if meta.is_file() and (cache / "stamp").is_file() and (cache / "stamp").read_text() == stamp:
        return cache
    torch.set_num_threads(1)
    cache.mkdir(parents=True, exist_ok=True)
    (cache.parent / ".gitignore").write_text("*\n")
    xtr, ytr, xte, yte = digits()
    xtr, xte = xtr.flatten(1), xte.flatten(1)
    hp = hyperparameters(n, seed)
    t0 = time.perf_counter()
    params = train(hp, xtr, ytr)
    seconds = time.perf_counter() - t0
    acc_tr, acc_te = accuracy(params, xtr, ytr), accuracy(params, xte, yte)
    # the saved weights must load into the architecture and give the same accuracy
    check = digits_mlp(HIDDEN)
    check.load_state_dict(state_dict(params, 0))
    acc0 = float((check(xte).argmax(-1) == yte).double().mean())
    assert abs(acc0 - float(acc_te[0])) < 1e-12, (acc0, float(acc_te[0]))
    (cache / "models").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        name = f"mlp-{i:04d}"
        save_file(state_dict(params, i), str(cache / "models" / f"{name}.safetensors"))
        rows.append(
            {"name": name, **{k: v[i].item() for k, v in hp.items()}}
            | {"train_acc": float(acc_tr[i]), "test_acc": float(acc_te[i])}
        )
    with meta.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (cache / "arch.py").write_text(ARCH)
    (cache / "stamp").write_text(stamp)
    lo, hi = float(acc_te.min()), float(acc_te.max())
    print(f"trained {n} models in {seconds:.1f} s; test accuracy {lo:.3f}..{hi:.3f}")
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="number of models")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    cache = build(a.n, a.cache, a.seed)
    print(f"zoo in {cache} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
