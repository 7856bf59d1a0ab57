"""Merging two small vision transformers trained from different seeds: permutation
matching against weight matching over the whole gauge group.

The model is `gaugenet.apply._vit.DigitsViT` on scikit-learn's 8×8 digits: 2×2 patches,
a linear embedding plus learned positions, pre-LN blocks (4-head softmax attention, ReLU
MLP) with LayerNorms without affine part, a final LayerNorm, mean over tokens, a linear
head. Its group (`vit_group`) is what `gaugenet.symmetries` finds plus the residual
stream's rotations `O(d − 1)` and permutations (`gaugenet.apply._residual`).

Alignments of the second model of a pair to the first (`gaugenet.apply.align_to`):

- `none`: as trained;
- `permutation`: weight matching over every permutation factor (residual features,
  heads, MLP units), coordinate-wise until none changes (Git Re-Basin's weight matching);
- `full`: the same, then sweeps of the residual rotation (orthogonal Procrustes), every
  other continuous factor by least squares (per-head query-key and value-output
  `GL(d_head)`, MLP rescalings, key/value shifts, LayerNorm translations) and the
  permutations again, each step kept only if it lowers the weight distance;
- `permutation, activations` and `full, activations`: the residual stream's permutation,
  resp. rotation, by activation matching instead (the LayerNorm-ed stream after the
  embedding and after every block, on 300 training images: a linear assignment, resp. an
  orthogonal Procrustes), then the other factors as above by weight matching.

Every aligned model is checked to compute the function of the model it came from, in
float64 (largest relative output change). Reported per pair: the squared weight distance
to the first model (what the alignments minimize), the test-loss barrier on the linear
path (`interpolation_barrier`, 11 points) and the test accuracy of the midpoint.
The table goes into README.md between the merge-transformers markers.

    .venv/bin/python benchmarks/merge_transformers.py [--seeds 0 1 2] [--rounds 1] [--no-readme]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from torch.func import functional_call

import gaugenet
from gaugenet.apply import accuracy, align_to, interpolation_barrier
from gaugenet.apply._match import match_stream, state_distance
from gaugenet.apply._models import digits, train
from gaugenet.apply._vit import DigitsViT, vit_group
from gaugenet.groups import GaugeGroup, model_state

HOW = ("none", "permutation", "full", "permutation, activations", "full, activations")
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- merge-transformers:start -->", "<!-- merge-transformers:end -->"


def write_readme(text: str) -> None:
    """Replace the text between the markers, atomically."""
    readme = README.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: f"{START}\n{text}\n{END}", readme)
    fd, tmp = tempfile.mkstemp(dir=README.parent, prefix=".README.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, README)


def midpoint_accuracy(a: torch.nn.Module, b: torch.nn.Module, x, y) -> float:
    sa, sb = model_state(a), model_state(b)
    mid = {k: 0.5 * (sa[k] + sb[k]) for k in sa}
    with torch.no_grad():
        return accuracy(functional_call(a, mid, (x,)), y)


def stream(model: DigitsViT, x: torch.Tensor) -> torch.Tensor:
    """The LayerNorm-ed residual stream after the embedding and every block: `(N·T·L, d)`."""
    with torch.no_grad():
        hs = [torch.nn.functional.layer_norm(h, h.shape[-1:]) for h in model.stream(x)]
    return torch.cat([h.reshape(-1, h.shape[-1]) for h in hs])


def align(
    how: str, ma: DigitsViT, mb: DigitsViT, x: torch.Tensor, group: GaugeGroup, rounds: int
) -> torch.nn.Module:
    """`mb` aligned to `ma`; `"…, activations"`: the residual stream's permutation or
    rotation by activation matching on `x` first, the other factors by weight matching."""
    if not how.endswith("activations"):
        return align_to(ma, mb, x[:2], align=how, group=group, rounds=rounds)
    kind = how.split(",")[0]
    res = {f.name: f for f in group.factors if f.name.endswith(":residual")}
    f = res["perm:residual" if kind == "permutation" else "rot:residual"]
    moved = group.act(mb, {f.name: match_stream(f, stream(ma, x), stream(mb, x))})
    rest = GaugeGroup(
        tuple(g for g in group.factors if g.name not in res),
        group.breakers,
        group.param_names,
        group.signature,
    )
    return align_to(ma, moved, x[:2], align=kind, group=rest, rounds=rounds)


def main() -> None:
    torch.set_num_threads(1)  # small models: threads only contend
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--width", type=int, default=64, help="residual width d")
    ap.add_argument("--mlp", type=int, default=128, help="MLP hidden units")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="sweeps of the full alignment")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--no-readme", action="store_true", help="print only")
    a = ap.parse_args()
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = digits(torch.float64)
    models = {}
    for s in a.seeds:
        torch.manual_seed(s)
        m = DigitsViT(a.width, a.heads, a.mlp)
        m = train(
            m, xtr.float(), ytr, epochs=a.epochs, lr=a.lr, seed=s, weight_decay=a.weight_decay
        )
        models[s] = m.double()
    t_train = time.perf_counter() - t0
    group = vit_group(models[a.seeds[0]], xte[:2])
    lines = [
        "| pair | alignment | weight distance² | test-loss barrier | midpoint test accuracy |"
        " function change |",
        "|---|---|---|---|---|---|",
    ]
    verdict, verdict_act = [], []
    for i, s in enumerate(a.seeds):
        for t in a.seeds[i + 1 :]:
            ma, mb = models[s], models[t]
            barrier = {}
            for how in HOW:
                aligned = align(how, ma, mb, xtr[:300], group, a.rounds)
                err = gaugenet.invariance_error(mb, aligned, xte)
                dist = state_distance(model_state(ma), model_state(aligned))
                barrier[how] = interpolation_barrier(ma, aligned, (xte, yte), n_points=11)
                acc = midpoint_accuracy(ma, aligned, xte, yte)
                lines.append(
                    f"| {s}-{t} | {how} | {dist:.1f} | {barrier[how]:.3f} | {acc:.3f} | {err:.1e} |"
                )
                print(lines[-1], flush=True)
            verdict.append(barrier["full"] <= barrier["permutation"])
            verdict_act.append(barrier["full, activations"] <= barrier["permutation, activations"])
    with torch.no_grad():
        accs = ", ".join(f"{s}: {accuracy(m(xte), yte):.3f}" for s, m in models.items())
    n_params = sum(p.numel() for p in models[a.seeds[0]].parameters())
    md = (
        "\n".join(lines)
        + f"\n\nDigitsViT(d={a.width}, heads={a.heads}, mlp={a.mlp}), {n_params} parameters,"
        f" AdamW (lr {a.lr}, weight decay {a.weight_decay}), {a.epochs} epochs;"
        f" endpoint test accuracies {accs}. Full-group barrier ≤ permutation-only barrier"
        f" on {sum(verdict)} of {len(verdict)} pairs with weight matching, on"
        f" {sum(verdict_act)} of {len(verdict_act)} with the residual stream matched on"
        " activations (300 training images). Function change: largest relative"
        " output change of the aligned model (float64)."
        f" {time.perf_counter() - t0:.0f} s in all ({t_train:.0f} s training).\n"
    )
    print(md)
    if not a.no_readme:
        write_readme(md)


if __name__ == "__main__":
    main()
