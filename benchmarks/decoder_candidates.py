"""Can the data see which element rounds best held out? A family of elements on the decoder.

For each scheme, a family of function-preserving elements of the trained decoder's group is
quantized by the same quantizer: plain rounding, gaugenet's chosen element (as in
`quantize_transformers.py --tasks decoder --distance kl --online`), every peer element that
preserves the function, and the grid {identity, gaugenet's weights-only element} ×
{no residual rotation, the Hadamard rotation, the Hadamard rotation with random signs} ×
{no online rotation, the online rotations `online_layers` proposes, before the layers whose
input no orthogonal factor of the group reaches (every o_proj and down_proj, as brevitas
places them), before every Linear layer}: the sets `equalize(..., online=True)` judges.
Each is scored on the validation windows (those gaugenet chooses on) and on the held-out
windows (those the table reports): the summed KL of its next-byte distributions to the float
model's and the change of the summed next-byte loss against the float model (nats; the
held-out one is what perplexity measures: `ΔL = tokens · log(ppl / ppl_float)`).

Printed per scheme: Spearman's rank correlation between the validation and held-out KL,
between the validation and held-out loss change, and between held-out KL and held-out loss
change, over all candidates and over the contenders (validation KL within 25 % of the lowest).
Where the contenders' held-out loss changes are not ranked by anything measured on validation,
which contender lands lowest held out is not a choice any method makes from its data.

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/decoder_candidates.py \\
        [--schemes w8a8 w4g128] [--json candidates.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import gaugenet
from decoder_paired import peer_models
from gaugenet.apply import (
    QuantScheme,
    equalize,
    equalizing_element,
    logit_kl,
    online_layers,
    quantize,
    rotate_inputs_online,
    rotation_matrix,
)
from gaugenet.apply._equalize import _group_rotated_inputs
from gaugenet.apply._online import rotatable_layers
from gaugenet.groups import GaugeGroup, OrthogonalFactor
from tiny_decoder import corpus, perplexity_and_kl, windows
from transformer_tasks import load_task

CONTENDER = 1.25  # validation KL within this factor of the lowest: a contender


def online_sets(
    model: nn.Module, calib, scheme: QuantScheme, group: GaugeGroup
) -> dict[str, tuple[str, ...]]:
    """Named sets of Linear layers to rotate online, as `equalize(..., online=True)` forms
    them: none, those `online_layers` proposes, the unreached ones (whose input no
    orthogonal factor of `group` rotates: every o_proj and down_proj of a Llama, where
    brevitas places its online rotations), every rotatable Linear layer."""
    every = rotatable_layers(model)
    reached = _group_rotated_inputs(group, model)
    return {
        "no online": (),
        "proposed online": tuple(online_layers(model, calib, scheme)),
        "unreached online": tuple(n for n in every if n not in reached),
        "all online": every,
    }


def rank_correlations(rows: list[dict]) -> dict[str, float]:
    """Spearman's ρ between the validation and held-out KL, the validation and held-out loss
    change, and the held-out KL and loss change, over `rows`."""
    col = {k: [r[k] for r in rows] for k in ("val_kl", "val_dl", "held_kl", "held_dl")}
    pairs = {"val KL ~ held KL": ("val_kl", "held_kl"), "val ΔL ~ held ΔL": ("val_dl", "held_dl"),
             "held KL ~ held ΔL": ("held_kl", "held_dl")}  # fmt: skip
    return {k: float(spearmanr(col[a], col[b]).statistic) for k, (a, b) in pairs.items()}


def contenders(rows: list[dict], factor: float = CONTENDER) -> list[dict]:
    """The rows whose validation KL is within `factor` of the lowest."""
    best = min(r["val_kl"] for r in rows)
    return [r for r in rows if r["val_kl"] <= factor * best]


def main() -> None:
    torch.set_num_threads(int(os.environ.get("GAUGENET_THREADS", "1")))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=["w8a8", "w4g128"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    t0 = time.time()
    task = load_task("decoder")
    model = task.model
    _, val, held = corpus()
    parts = {"val": windows(val), "held": windows(held)}
    refs: dict[str, list] = {p: [] for p in parts}
    base = {}
    for p, x in parts.items():
        ppl, _ = perplexity_and_kl(model, x, refs[p])
        base[p] = (ppl, x[:, 1:].numel())
    peers = peer_models(task, print)
    group = gaugenet.symmetries(model, task.calib)
    orth = next(f for f in group.factors if isinstance(f, OrthogonalFactor))
    had = rotation_matrix(orth.d)
    signs = torch.randint(0, 2, (orth.d,), generator=torch.Generator().manual_seed(0)) * 2 - 1
    residual = {"": None, " + Hadamard": had, " + signed Hadamard": signs[:, None].double() * had}
    result = {}
    for s in a.schemes:
        sch = QuantScheme.parse(s)
        kw = dict(bits=sch.weight_bits, objective="output", scheme=sch, group=group, search=60,
                  learn=60, distance=logit_kl, validation=task.validation,
                  validation_distance=task.validation_distance)  # fmt: skip
        _, element = equalizing_element(model, task.calib, **kw)
        ident = {f.name: f.identity(torch.float64) for f in group.continuous}
        chosen = equalize(model, task.calib, **kw, online=True)
        models = {"round-to-nearest": model, **peers, "gaugenet equalize, online": chosen}
        sets = online_sets(model, task.calib, sch, group)
        for label, el in (("identity", ident), ("gaugenet element", element)):
            for rl, r in residual.items():
                o = el.get(orth.name, orth.identity(torch.float64))
                e = dict(el) if r is None else {**el, orth.name: r @ o}
                moved = group.act(model, e)
                for ol, names in sets.items():
                    if ol == "proposed online" and not names:
                        continue
                    models[f"{label}{rl}, {ol}"] = rotate_inputs_online(moved, names)
        rows = []
        for label, m in models.items():
            q = quantize(m, sch)
            row = {"candidate": label}
            for p, x in parts.items():
                ppl, kl = perplexity_and_kl(q, x, refs[p])
                row[f"{p}_kl"] = kl
                row[f"{p}_dl"] = base[p][1] * (math.log(ppl) - math.log(base[p][0]))
                row[f"{p}_ppl"] = ppl
            rows.append(row)
            print(f"{s} {label:48s} val KL {row['val_kl']:9.4f} ΔL {row['val_dl']:8.3f} | held "
                  f"KL {row['held_kl']:9.4f} ΔL {row['held_dl']:8.3f} ppl {row['held_ppl']:.6f}"
                  f"  {time.time() - t0:.0f} s", flush=True)  # fmt: skip
        near = contenders(rows)
        summary = {"all": rank_correlations(rows), "contenders": rank_correlations(near)}
        dl = sorted(r["held_dl"] for r in near)
        summary["contender held ΔL range"] = [dl[0], dl[-1]]
        summary["contenders"]["n"] = len(near)
        summary["all"]["n"] = len(rows)
        by_val_dl = min(near, key=lambda r: r["val_dl"])
        summary["lowest validation ΔL"] = {
            "candidate": by_val_dl["candidate"],
            "held ΔL rank": 1 + sum(r["held_dl"] < by_val_dl["held_dl"] for r in near),
        }
        result[s] = {"rows": rows, "summary": summary}
        print(f"{s}: {json.dumps(summary, ensure_ascii=False)}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
