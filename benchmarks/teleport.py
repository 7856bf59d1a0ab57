"""Symmetry teleportation on the digits ReLU MLP (2 hidden layers).

Plain SGD runs 500 steps; SGD with teleportation (once at the start, 10 ascent steps on
‖∇L‖² along the rescaling orbit) runs until it reaches plain SGD's final loss. Prints, over
5 seeds, the mean and spread of the steps it needs, and the wall-clock times.

    .venv/bin/python benchmarks/teleport.py [--seeds 5] [--steps 500] [--every N]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from gaugenet.reproduce.claims.dynamics import teleport_race


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=None, help="teleport period (default: once)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [teleport_race(s, steps=args.steps, every=args.every) for s in range(args.seeds)]
    for s, r in enumerate(rows):
        print(
            f"seed {s}: plain {r['plain_steps']} steps {r['plain_time']:.2f}s | teleport "
            f"{r['tele_steps']} steps {r['tele_time']:.2f}s | target loss {r['target']:.4f}"
        )
    steps = [r["tele_steps"] for r in rows]
    tp = [r["plain_time"] for r in rows]
    tt = [r["tele_time"] for r in rows]
    print(
        f"steps to reach plain SGD's {args.steps}-step loss: mean {statistics.mean(steps):.1f} "
        f"± {statistics.pstdev(steps):.1f} (vs {args.steps}; "
        f"{100 * (1 - statistics.mean(steps) / args.steps):+.1f}% fewer)"
    )
    print(
        f"wall clock: plain {statistics.mean(tp):.2f}s ± {statistics.pstdev(tp):.2f}, "
        f"teleport {statistics.mean(tt):.2f}s ± {statistics.pstdev(tt):.2f}"
    )


if __name__ == "__main__":
    main()
