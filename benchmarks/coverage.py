"""Coverage of discovery: what `gaugenet.symmetries` finds on common architectures, against
the redundancy the Jacobian shows.

Each row builds a tiny float64 model with random weights of unit gain (Hugging Face models
from their configs: hidden size 8-16, one or two layers; torch and hand-written CNNs with
small widths) and a batch of inputs that reaches every parameter (every token id and
position, both token types), then reports

- `dim`: the dimension of the group `symmetries` returns (or its refusal message),
- `n − rank J`: parameters minus the rank of the Jacobian of all outputs on the batch
  (`gaugenet.certify.functional_dimension`, float64 throughout: casts to float32 inside
  the model are kept in float64, `rtol = 1e-9`): every continuous
  symmetry lies in its kernel, so `dim ≤ n − rank J`, and the gap is what discovery misses
  (symmetries it does not know, or redundancy that no symmetry explains),
- `inv. err.`: the relative output change under a random element of the group,
- `internal`: factors the self-check dropped (wrong answers caught before returning),
- `time`: seconds spent in `symmetries`,
- `gap`: where `ker J` exceeds the group's orbit (`gaugenet.certify.locate_gap`), each
  missing direction attributed by projection to a measured cause or left unexplained:
  parameter entries never read on the inputs (embedding rows no token selects: redundant
  on these inputs, not symmetries), entries read only in a fixed sum on these inputs
  (equal Jacobian columns), layers fed by a table (directions that leave `ker J` once
  those layers' inputs are made distinct), LayerNorms whose `eps` is under the rank
  tolerance (the constructed scalings of each norm's input rows, symmetries up to `eps`);
  the unexplained rest by the parameters it lives in, with the ReLU layers whose units are
  dead or always active on the inputs (more redundancy than the rescalings, not measured).

The Markdown table is written into README.md between the coverage markers.

    .venv/bin/python benchmarks/coverage.py [--only PATTERN] [--no-readme] [--threads 2]
"""

from __future__ import annotations

import argparse
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gaugenet
from coverage_models import ROWS, G
from coverage_models_more import MORE_ROWS
from gaugenet.certify import locate_gap
from gaugenet.certify._causes import relu_causes
from gaugenet.certify._functional_dimension import rank_of
from gaugenet.certify._jacobian import flat_model, jacobian_of
from gaugenet.certify._keywords import positional
from gaugenet.certify._orbit import orbit_projector
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"


def _rank_gap(model: nn.Module, inputs: Any, group: Any = None) -> tuple[str, int, str]:
    """`(n − rank J, n_params, cause)`: the cause says where `ker J` exceeds the group's
    orbit (`gaugenet.certify.locate_gap`), when it does."""
    flat_m, flat_in = positional(model, inputs)  # keyword inputs as positional ones
    n = sum(p.numel() for p in model.parameters())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with keep_float64():
                fm = flat_model(flat_m, flat_in)
                jac = jacobian_of(fm)
                fd = rank_of(jac, rtol=1e-9)
                cause = ""
                if group is not None and n - fd.rank > group.dim:
                    names = list(fm.names)
                    orbit = orbit_projector(model, group)
                    gap = locate_gap(jac, orbit, fd.rank, names, fm.sizes, flat=fm)
                    lines = gap.lines(top=2)
                    relu = relu_causes(flat_m, flat_in) if gap.unexplained else []
                    if relu:
                        lines.append(f"{len(relu)} ReLU layers with dead or always-active units")
                    cause = "; ".join(lines)
    except Exception as exc:  # report the failure in the table, do not stop
        return f"– ({type(exc).__name__})", n, ""
    return str(n - fd.rank), n, cause


def run_row(name: str, build: Callable[[], tuple[nn.Module, Any]]) -> dict[str, str]:
    torch.manual_seed(0)
    G.manual_seed(0)  # each row's inputs whatever rows ran before it (and with --only)
    row = {"model": name}
    try:
        model, inputs = build()
    except Exception as exc:  # a config this transformers version rejects
        return {
            **row,
            "params": "",
            "dim": "not built: " + _short(str(exc)),
            "gap": "",
            "err": "",
            "internal": "",
            "time": "",
            "cause": "",
        }
    t = time.perf_counter()
    try:
        group = gaugenet.symmetries(model, inputs)
    except gaugenet.GaugeError as exc:
        row["time"] = f"{time.perf_counter() - t:.2f}"
        row["dim"] = "refused: " + _short(str(exc))
        row["gap"], n, row["cause"] = _rank_gap(model, inputs)
        row.update(params=str(n), err="", internal="")
        return row
    row["time"] = f"{time.perf_counter() - t:.2f}"
    row["dim"] = str(group.dim)
    g = group.sample(torch.Generator().manual_seed(1))
    with keep_float64():
        err = gaugenet.invariance_error(model, group.act(model, g), inputs)
    row["err"] = f"{err:.0e}"
    row["internal"] = str(sum(b.reason.startswith(INTERNAL_ERROR) for b in group.breakers))
    row["gap"], n, row["cause"] = _rank_gap(model, inputs, group)
    row["params"] = str(n)
    return row


def _short(msg: str, n: int = 90) -> str:
    msg = " ".join(msg.split()).replace("|", "/")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def table(rows: list[dict[str, str]]) -> str:
    head = "| model | params | dim | n − rank J | inv. err. | internal | time (s) | gap |"
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']} | {r['dim']} | {r['gap']} | {r['err']} | "
            f"{r['internal']} | {r['time']} | {r.get('cause', '')} |"
        )
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = README.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    README.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", readme))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="regular expression on the row names")
    ap.add_argument("--no-readme", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, build in ROWS + MORE_ROWS:
        if args.only and not re.search(args.only, name):
            continue
        rows.append(run_row(name, build))
        r = rows[-1]
        print(f"{name}: dim {r['dim']}, n - rank J {r['gap']}, {r['time']} s", flush=True)
    text = table(rows)
    print(text)
    if not args.no_readme and not args.only:
        write_readme(text)


if __name__ == "__main__":
    main()
