"""Zoo sweep throughput with 1 and 2 local workers, and the same sweep on a separately
started Dask scheduler with two workers (all on 127.0.0.1), checked to give identical results.

The zoo is `benchmarks/zoo_build.py`'s (built if missing); the task is `canonicalize`.
Throughput is reported twice: over the whole call (cluster start included) and steady
(rows finished per second between the first and the last finished row). Scaling efficiency
is the steady 2-worker throughput over twice the 1-worker one. Identical means: the same
rows (content hash, fingerprint, dimensions, drift, verdict, error) and byte-identical
written weights.

    .venv/bin/python benchmarks/zoo_throughput.py [--glob 'mlp-0[0-2]*'] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import gaugenet
import gaugenet.zoo
import zoo_build

SAME = ["path", "content_hash", "arch_fingerprint", "n_params", "symmetry_dim", "drift"]
SAME += ["verdict", "error"]


def _env() -> dict[str, str]:
    src = str(Path(gaugenet.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def external_cluster(folder: Path, workers: int = 2) -> tuple[str, list[subprocess.Popen]]:
    """`dask scheduler` and `workers` × `dask worker` (1 thread each), loopback only."""
    dask = str(Path(sys.executable).parent / "dask")
    file = folder / "scheduler.json"
    quiet = {"env": _env(), "stderr": subprocess.DEVNULL}
    cmd = [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
    cmd += ["--idle-timeout", "120s"]
    procs = [subprocess.Popen([*cmd, "--scheduler-file", str(file)], **quiet)]
    while not file.is_file():
        time.sleep(0.1)
    address = json.loads(file.read_text())["address"]
    for i in range(workers):
        cmd = [dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1"]
        cmd += ["--death-timeout", "60"]
        procs.append(subprocess.Popen([*cmd, "--no-dashboard", "--name", f"w{i}"], **quiet))
    return address, procs


def measure(df: pd.DataFrame) -> tuple[float, float]:
    whole = df.attrs["computed"] / df.attrs["seconds"]
    t = df["finished_at"].sort_values()
    return whole, (len(t) - 1) / (t.iloc[-1] - t.iloc[0])


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=zoo_build.DEFAULT_CACHE)
    ap.add_argument("--glob", default="mlp-0[0-2]*", help="which of the zoo's models")
    ap.add_argument("--out", type=Path, default=None, help="write the table as markdown")
    a = ap.parse_args()
    cache = zoo_build.build(600, a.cache)
    zoo, arch = str(cache / "models" / (a.glob + ".safetensors")), str(cache / "arch.py:mlp")
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="zoo-throughput-"))
    runs = {}
    for w in (1, 2):
        runs[f"local, {w} worker{'s' * (w > 1)}"] = gaugenet.zoo.run(
            zoo, "canonicalize", out=tmp / f"local{w}", arch=arch, workers=w
        )
    address, procs = external_cluster(tmp)
    try:
        from distributed import Client

        with Client(address) as c:
            c.wait_for_workers(2, timeout=120)
        runs["dask scheduler + 2 dask workers"] = gaugenet.zoo.run(
            zoo, "canonicalize", out=tmp / "external", arch=arch, scheduler=address
        )
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    local, ext = runs["local, 2 workers"], runs["dask scheduler + 2 dask workers"]
    same_rows = local[SAME].equals(ext[SAME])
    same_files = [_digest(p) for p in local["output"]] == [_digest(p) for p in ext["output"]]
    n = len(local)
    lines = [
        f"canonicalize over {n} digits MLPs (load average {load:.1f} on {os.cpu_count()} "
        "cores at the start):",
        "",
        "| cluster | whole call (ckpt/s) | steady (ckpt/s) | discoveries |",
        "|---|---|---|---|",
    ]
    rates = {}
    for name, df in runs.items():
        whole, steady = measure(df)
        rates[name] = steady
        found = int((~df["discovery_cached"].astype(bool)).sum())
        lines.append(f"| {name} | {whole:.2f} | {steady:.2f} | {found} |")
    eff = rates["local, 2 workers"] / (2 * rates["local, 1 worker"])
    lines += [
        "",
        f"scaling efficiency (steady, 2 workers vs 1): {eff:.2f}",
        f"external scheduler vs local cluster: rows identical: {same_rows}; "
        f"written weights byte-identical: {same_files}",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    if not (same_rows and same_files):
        raise SystemExit("the external cluster's results differ from the local cluster's")


if __name__ == "__main__":
    main()
