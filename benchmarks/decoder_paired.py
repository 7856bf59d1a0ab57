"""Paired per-window comparison on the trained decoder: is gaugenet's lead or lag a tie?

For each scheme, gaugenet's element (chosen as in `quantize_transformers.py --tasks decoder
--distance kl`: search 60, learn 60, chosen on the validation topics) and every peer element
that preserves the function (relative output change at most 1e-3) are quantized by the same
quantizer, and each window's summed next-byte loss (nats) is taken on the 364 validation
windows and the 363 held-out windows. Per peer and part: `gaugenet − peer` summed over the
windows, its bootstrap standard deviation over windows and over topics (2 000 resamples,
seed 0; windows of one topic are correlated, so whole topics resampled give the honest
spread) and the number of windows where gaugenet's loss is lower. A difference within
about two standard deviations (over topics) is not resolved by that text.

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/decoder_paired.py \\
        [--schemes w4 w4a8 ...] [--json paired.json] [--online]

With `--online`, gaugenet's element chosen with online input rotations
(`equalize(..., online=True)`) is compared too (JSON key `"<scheme>, online"`), with every
peer (brevitas' rotation with its own online rotations included) and with gaugenet's element
without them; where it keeps no online rotation it is that element, and the key says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))

import gaugenet
import quantize_transformers as qt
from gaugenet.apply import QuantScheme, equalize, logit_kl, quantize, rotated_layers
from tiny_decoder import SEQ, corpus, split_topics, windows
from transformer_tasks import load_task


def window_nll(model: nn.Module, x: Tensor, chunk: int = 16) -> Tensor:
    """Summed next-byte cross-entropy (nats, float64) of each window of `x` `(n, seq)` → `(n,)`."""
    out = []
    with torch.no_grad():
        for part in x.split(chunk):
            logits = model(input_ids=part).logits[:, :-1].double()
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), part[:, 1:], reduction="none")
            out.append(nll.sum(1))
    return torch.cat(out)


def window_topics(names: list[str], n_windows: int, seq: int = SEQ) -> Tensor:
    """The topic (index into `names`) of each window of a part (`corpus`: the topics joined
    by blank lines, cut into windows from the start): the topic holding its first byte."""
    import pydoc_data.topics as t

    ends = torch.tensor(
        [len(t.topics[k].encode("utf-8")) + 2 for k in names], dtype=torch.long
    ).cumsum(0)
    starts = torch.arange(n_windows) * seq
    return torch.searchsorted(ends, starts, right=True)


def paired(d: Tensor, topics: Tensor, resamples: int = 2000) -> dict:
    """Sum of the per-window differences `d`, its bootstrap standard deviations over windows
    and over topics (windows of one topic are correlated: resampling whole topics is the
    honest spread), and how many windows are below zero."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(d), (resamples, len(d)), generator=g)
    ids, inverse = torch.unique(topics, return_inverse=True)
    per_topic = torch.zeros(len(ids), dtype=d.dtype).index_add_(0, inverse, d)
    pick = torch.randint(0, len(ids), (resamples, len(ids)), generator=g)
    return {
        "difference": float(d.sum()),
        "sd": float(d[idx].sum(1).std()),
        "sd_topics": float(per_topic[pick].sum(1).std()),
        "topics": len(ids),
        "gaugenet_lower": int((d < 0).sum()),
        "windows": len(d),
    }


def peer_models(task, log) -> dict[str, nn.Module]:
    """The peers' function-preserving float elements, by label."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        state = {k: v.contiguous() for k, v in task.model.state_dict().items()}
        save_file(state, str(work / "float.safetensors"))
        qt._save_inputs(qt.peer_calibration(task, True), work / "calib.safetensors")
        y = task.outputs(task.model)
        peers_dir = Path(os.environ.get("GAUGENET_PEERS", "/work/peers"))
        for peer, recipes in qt.PEER_METHODS.items():
            res = qt.run_peer(peer, task, work, peers_dir, log)
            for r, label in recipes.items():
                if not res[r].get("ok"):
                    continue
                m = qt._with_state(task.model, res[r]["state"], res[r].get("online"))
                if qt.relative_change(task.outputs(m), y) <= 1e-3:
                    out[label] = m
    return out


def main() -> None:
    torch.set_num_threads(int(os.environ.get("GAUGENET_THREADS", "1")))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=list(qt.SCHEMES))
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--online",
        action="store_true",
        help="gaugenet's element with online input rotations (equalize(..., online=True)), "
        "also compared with its element without them",
    )
    a = ap.parse_args()
    task = load_task("decoder")
    _, val, held = corpus()
    parts = {"validation": windows(val), "held out": windows(held)}
    split = split_topics()
    topics = {
        p: window_topics(split[k], len(parts[p]))
        for p, k in (("validation", "validation"), ("held out", "held_out"))
    }
    peers = peer_models(task, print)
    group = gaugenet.symmetries(task.model, task.calib)
    result = {}
    for s in a.schemes:
        t0 = time.time()
        sch = QuantScheme.parse(s)
        kw = dict(bits=sch.weight_bits, objective="output", scheme=sch, group=group, search=60,
                  learn=60, distance=logit_kl, validation=task.validation,
                  validation_distance=task.validation_distance)  # fmt: skip
        models = {"round-to-nearest": task.model, **peers}
        # equalize is deterministic: where no online rotation is kept, the element chosen
        # with online=True is the weights-only one, so it is searched again only where kept
        rot = equalize(task.model, task.calib, **kw, online=True) if a.online else None
        kept = rot is not None and bool(rotated_layers(rot))
        plain = rot if rot is not None and not kept else equalize(task.model, task.calib, **kw)
        ours = {"gaugenet equalize": plain}
        if kept:
            ours["gaugenet equalize, online"] = rot
        elif a.online:
            result[f"{s}, online"] = "no online rotation kept: the weights-only element"
        loss = {
            label: {p: window_nll(quantize(m, sch), x) for p, x in parts.items()}
            for label, m in {**models, **ours}.items()
        }
        for mine in ours:
            key = s if mine == "gaugenet equalize" else f"{s}, online"
            result[key] = {}
            for label in loss:
                if label == mine or (label in ours and mine == "gaugenet equalize"):
                    continue
                result[key][label] = {
                    p: paired(loss[mine][p] - loss[label][p], topics[p]) for p in parts
                }
                line = "  ".join(
                    f"{p} {r['difference']:+.1f} ± {r['sd']:.1f} (± {r['sd_topics']:.1f} over "
                    f"{r['topics']} topics) nats, lower on {r['gaugenet_lower']}/{r['windows']}"
                    for p, r in result[key][label].items()
                )
                print(f"{key} {mine} − {label}: {line}", flush=True)
        print(f"{s}: {time.time() - t0:.0f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
