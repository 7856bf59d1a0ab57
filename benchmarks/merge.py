"""Loss barrier on the linear path between two digits MLPs trained from different seeds.

Alignments: none; permutation matching alone (Git Re-Basin weight matching: one linear
assignment per permutation factor, coordinate-wise until none changes; implemented here with
scipy's `linear_sum_assignment`); gaugenet `merge` (canonical gauge, then permutations and
rescalings matched). Also the test accuracy of the merged (averaged) model.

    .venv/bin/python benchmarks/merge.py [--out FILE.md] [--seeds 0 1 2] [--hidden 64]
"""

from __future__ import annotations

import argparse

import torch

from gaugenet.apply import accuracy, align_pair, interpolation_barrier, merge
from gaugenet.apply._models import digits, digits_mlp, train

HOW = ("none", "permutation", "permutation+gauge")


def main() -> None:
    torch.set_num_threads(1)  # small models: threads only contend
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the table as markdown to this file")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    a = ap.parse_args()
    xtr, ytr, xte, yte = digits()
    models = {}
    for s in a.seeds:
        torch.manual_seed(s)
        models[s] = train(digits_mlp(a.hidden), xtr, ytr, epochs=a.epochs, lr=3e-3, seed=s)
    lines = [
        "| pair | alignment | test-loss barrier | train-loss barrier | merged test accuracy |",
        "|---|---|---|---|---|",
    ]
    for i, s in enumerate(a.seeds):
        for t in a.seeds[i + 1 :]:
            for how in HOW:
                ma, mb = align_pair(models[s], models[t], xte[:2], align=how)
                bte = interpolation_barrier(ma, mb, (xte, yte), n_points=21)
                btr = interpolation_barrier(ma, mb, (xtr, ytr), n_points=21)
                with torch.no_grad():
                    acc = accuracy(merge([models[s], models[t]], xte[:2], align=how)(xte), yte)
                lines.append(f"| {s}-{t} | {how} | {bte:.4f} | {btr:.4f} | {acc:.4f} |")
                print(lines[-1], flush=True)
    with torch.no_grad():
        accs = ", ".join(f"{s}: {accuracy(m(xte), yte):.4f}" for s, m in models.items())
    md = "\n".join(lines) + f"\n\nEndpoint test accuracies: {accs}\n"
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# Merging two digits MLPs (hidden {a.hidden}, ReLU)\n\n" + md)


if __name__ == "__main__":
    main()
