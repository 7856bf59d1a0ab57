"""Symmetry teleportation on the digits ReLU MLP (2 hidden layers).

Plain SGD (step size 0.7, the best of a grid for plain SGD) runs 500 steps; SGD of the same
step size with a teleport (default: once at the start, ascent on ‖∇L‖² along the rescaling
orbit capped at a 2× gain) runs until it reaches plain SGD's final loss. A control run moves
to a random orbit point instead (ξ ~ N(0, 0.2²)): the runs are chaotic at this step size, so
any move changes the step count, and a teleport only helps if it beats the control. Prints,
over 5 seeds, the mean and spread of the steps each needs, and the wall-clock times.

    .venv/bin/python benchmarks/teleport.py [--seeds 5] [--steps 500] [--every N]
        [--objective grad|lookahead|norm] [--max-gain G] [--unroll K] [--tele-steps S]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from gaugenet.reproduce.claims.dynamics import RACE_TELEPORT, teleport_race


def _mean_sd(v: list[float]) -> str:
    if any(x == float("inf") for x in v):
        return f"{sum(x == float('inf') for x in v)} of {len(v)} never got there"
    return f"{statistics.mean(v):.1f} ± {statistics.pstdev(v):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=None, help="teleport period (default: once)")
    ap.add_argument("--objective", default="grad", choices=("grad", "lookahead", "norm"))
    ap.add_argument("--max-gain", type=float, default=RACE_TELEPORT["max_gain"])
    ap.add_argument("--unroll", type=int, default=1)
    ap.add_argument("--tele-steps", type=int, default=10)
    ap.add_argument("--control", type=float, default=0.2, help="σ of the random move")
    args = ap.parse_args()
    torch.set_num_threads(1)
    opts = {"objective": args.objective, "tele_steps": args.tele_steps, "every": args.every}
    if args.objective == "grad":
        opts["max_gain"] = args.max_gain if args.max_gain > 0 else None
    if args.objective == "lookahead":
        opts["unroll"] = args.unroll
    rows = [teleport_race(s, steps=args.steps, **opts) for s in range(args.seeds)]
    ctrl = [
        teleport_race(s, steps=args.steps, every=args.every, control=args.control)
        for s in range(args.seeds)
    ]
    for s, (r, c) in enumerate(zip(rows, ctrl)):
        print(
            f"seed {s}: plain {r['plain_steps']} steps {r['plain_time']:.2f}s | teleport "
            f"{r['tele_steps']} steps {r['tele_time']:.2f}s | random move {c['tele_steps']} "
            f"steps | target loss {r['target']:.4f}"
        )
    plain = [r["plain_steps"] for r in rows]
    steps = [r["tele_steps"] for r in rows]
    ctl = [c["tele_steps"] for c in ctrl]
    tp = [r["plain_time"] for r in rows]
    tt = [r["tele_time"] for r in rows]
    print(f"teleport {opts}")
    print(
        f"steps to reach plain SGD's {args.steps}-step loss: plain {_mean_sd(plain)}, "
        f"teleport {_mean_sd(steps)}, random orbit move {_mean_sd(ctl)}"
    )
    if all(v != float("inf") for v in steps):
        print(
            f"teleport: {100 * (1 - statistics.mean(steps) / statistics.mean(plain)):+.1f}% "
            f"fewer steps than plain SGD"
        )
    print(
        f"wall clock: plain {statistics.mean(tp):.2f}s ± {statistics.pstdev(tp):.2f} "
        f"({args.steps} steps), teleport {statistics.mean(tt):.2f}s ± "
        f"{statistics.pstdev(tt):.2f} (to the target, teleports included)"
    )


if __name__ == "__main__":
    main()
