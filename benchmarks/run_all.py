"""Run the benchmarks one after another (`make bench`), each in its own process, and print a
summary of exit codes and wall times.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/run_all.py [--only NAME ...] [--skip NAME ...]
        [--list] [--logs DIR] [--readme]

Each benchmark's output goes to `DIR/NAME.log` (default `bench-logs/`) as well as the
terminal. Without `--readme` no benchmark rewrites the README (`coverage.py` and
`coverage_real.py` get `--no-readme`). The quantization benchmark against brevitas and
llm-compressor and its paired analysis need their environments (`bash
benchmarks/peers_setup.sh`); they are skipped, with the reason in the summary, where those
are missing. Altogether the runs take hours on a two-core machine; `--only` picks some.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# name → (arguments, what it measures); in the order of the README's list
BENCHMARKS: dict[str, tuple[list[str], str]] = {
    "wilson_lines": ([], "Magnus Wilson lines against torchdiffeq and scipy"),
    "discovery": ([], "discovery and certification speed"),
    "quantize": ([], "equalization before quantization against anchors"),
    "quantize_transformers": ([], "against brevitas and llm-compressor, four models"),
    "decoder_paired": (["--online"], "the decoder's rows paired window by window"),
    "decoder_candidates": ([], "can validation see which decoder element rounds best?"),
    "merge": ([], "gauge-aware merging against permutation matching"),
    "merge_transformers": ([], "ViT merging: the full group against permutations"),
    "teleport": ([], "symmetry teleportation against plain SGD"),
    "zoo_build": ([], "a zoo of digits MLPs (cached)"),
    "zoo_throughput": ([], "zoo sweeps on 1 and 2 workers and a separate scheduler"),
    "zoo_predict": ([], "accuracy from raw, canonical and aligned weights"),
    "coverage": (["--no-readme"], "discovery against n - rank J"),
    "coverage_real": (["--no-readme"], "the same on released weights"),
    "meta_discovery": ([], "a Llama-2-7B-shaped model analyzed on the meta device"),
    "stream_1b": ([], "equalize and quantize a 1.1 B sharded checkpoint"),
}
WRITES_README = {"coverage", "coverage_real"}
NEEDS_PEERS = {"quantize_transformers", "decoder_paired", "decoder_candidates"}
# scripts with a command line that are not benchmarks of their own
HELPERS = {
    "peer_run": "one peer's recipes in its own environment, called by quantize_transformers",
    "tiny_decoder": "trains and caches the decoder that quantize_transformers scores",
    "run_all": "this runner",
}


def _peers_missing() -> str | None:
    peers = Path(os.environ.get("GAUGENET_PEERS", "/work/peers"))
    missing = [p for p in ("brevitas", "llmcompressor") if not (peers / p).is_dir()]
    if missing:
        return f"no peer environment {', '.join(missing)} in {peers} (peers_setup.sh)"
    return None


def run(name: str, extra: list[str], logs: Path) -> tuple[int, float]:
    """Run one benchmark, its output teed to `logs/NAME.log`: `(exit code, seconds)`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    cmd = [sys.executable, str(HERE / f"{name}.py"), *extra]
    t0 = time.time()
    with open(logs / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=HERE.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            log.write(line.decode(errors="replace"))
        code = proc.wait()
    return code, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, choices=list(BENCHMARKS))
    ap.add_argument("--skip", nargs="+", default=[], choices=list(BENCHMARKS))
    ap.add_argument("--list", action="store_true", help="list the benchmarks and stop")
    ap.add_argument("--logs", type=Path, default=Path("bench-logs"))
    ap.add_argument("--readme", action="store_true", help="let coverage tables rewrite README")
    a = ap.parse_args()
    if a.list:
        for name, (args, what) in BENCHMARKS.items():
            print(f"{name:24s} {what}" + (f"  ({' '.join(args)})" if args else ""))
        return
    names = [n for n in (a.only or BENCHMARKS) if n not in a.skip]
    a.logs.mkdir(parents=True, exist_ok=True)
    summary: list[tuple[str, str]] = []
    for name in names:
        args = list(BENCHMARKS[name][0])
        if a.readme and name in WRITES_README:
            args.remove("--no-readme")
        why = _peers_missing() if name in NEEDS_PEERS else None
        if why:
            summary.append((name, f"skipped: {why}"))
            continue
        print(f"== {name} {' '.join(args)}", flush=True)
        code, secs = run(name, args, a.logs)
        summary.append((name, f"{'ok' if code == 0 else f'FAILED (exit {code})'}, {secs:.0f} s"))
    print("\n== summary")
    for name, what in summary:
        print(f"{name:24s} {what}")
    if any("FAILED" in what for _, what in summary):
        sys.exit(1)


if __name__ == "__main__":
    main()
