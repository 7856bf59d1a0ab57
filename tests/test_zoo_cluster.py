"""`gaugenet.zoo.run` on Dask: an embedded cluster, a rerun that skips finished rows, the
CLI, and a separately started scheduler whose worker is killed mid-sweep (loopback only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import gaugenet
from gaugenet.cli._app import _register, app
from gaugenet.zoo import run

_register()
DASK = str(Path(sys.executable).parent / "dask")
#: a factory that takes a while, so that a sweep can be interrupted while it runs
ARCH = """
import time
from torch import nn
def net():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
def slow():
    time.sleep(0.25)
    return net()
"""


def _zoo(tmp_path: Path, n: int) -> Path:
    (tmp_path / "arch.py").write_text(ARCH)
    d = tmp_path / "zoo"
    d.mkdir()
    for i in range(n):
        torch.manual_seed(i)
        net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        save_file(net.state_dict(), str(d / f"m{i}.safetensors"))
    return d


def _env() -> dict[str, str]:
    src = str(Path(gaugenet.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_local_cluster_rerun_and_cli(tmp_path) -> None:
    d = _zoo(tmp_path, 6)
    (d / "broken.pt").write_bytes(b"\x00not torch")
    out, arch = tmp_path / "out", f"{tmp_path / 'arch.py'}:net"
    df = run(d, "canonicalize", out=out, arch=arch, workers=1)
    assert len(df) == 7 and df.attrs["computed"] == 7
    assert (df["verdict"] == "ok").sum() == 6 and df["drift"].max() < 1e-5
    bad = df[df["verdict"] == "error"]
    assert list(bad["path"]) == [str(d / "broken.pt")] and "torch" in bad["error"].iloc[0]
    assert df["discovery_cached"].sum() == 5  # one discovery for the one architecture
    assert (out / "canonicalize.parquet").is_file() and len(list(out.glob("canonicalize/*"))) == 6
    # a rerun reuses every finished row; a changed input is redone
    again = run(d, "canonicalize", out=out, arch=arch, workers=1)
    assert again.attrs["skipped"] == 7 and again.attrs["computed"] == 0
    assert again.drop(columns="worker").equals(df.drop(columns="worker"))
    # the CLI, on the same results: nothing to redo (and no cluster to start)
    r = CliRunner().invoke(app, ["zoo", "canonicalize", str(d), "--out", str(out), "--arch", arch])
    assert r.exit_code == 0, r.output
    assert "0 computed, 7 reused" in r.output.replace("\n", " ")
    r = CliRunner().invoke(app, ["zoo", "inspect", str(d), "--out", str(d)])
    assert r.exit_code == 2 and "no checkpoints" in r.output  # results inside the zoo: excluded


@pytest.fixture
def scheduler(tmp_path):
    """`dask scheduler` and two `dask worker` processes (no nanny), on 127.0.0.1 only."""
    file = tmp_path / "scheduler.json"
    quiet = {"env": _env(), "stderr": subprocess.DEVNULL}
    scheduler = [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
    scheduler += ["--idle-timeout", "60s"]  # a safety net: it ends itself if left behind
    procs = [subprocess.Popen([*scheduler, "--scheduler-file", str(file)], **quiet)]
    deadline, address = time.time() + 120, None
    while address is None and time.time() < deadline:
        try:  # the scheduler writes the file in steps: wait until it parses
            address = json.loads(file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    assert address is not None, "the dask scheduler did not start within 120 s"
    assert address.startswith("tcp://127.0.0.1:")
    worker = [DASK, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard"]
    worker += ["--death-timeout", "30"]
    for name in ("w1", "w2"):
        procs.append(subprocess.Popen([*worker, "--host", "127.0.0.1", "--name", name], **quiet))
    try:
        from distributed import Client

        with Client(address) as c:
            c.wait_for_workers(2, timeout=60)
        yield address, procs
    finally:
        for p in procs:  # nothing to save: kill our own processes at once
            p.kill()
            p.wait()


def _parts(out: Path) -> dict[str, float]:
    """Finished rows on disk: part file name -> its modification time."""
    parts = out / ".parts" / "inspect"
    return {p.name: p.stat().st_mtime for p in parts.glob("*.parquet")} if parts.is_dir() else {}


def _wait_for_parts(out: Path, n: int, timeout: float = 60) -> dict[str, float]:
    deadline = time.time() + timeout
    while len(found := _parts(out)) < n and time.time() < deadline:
        time.sleep(0.05)
    return found


def test_killed_worker_and_killed_sweep_lose_nothing(tmp_path, scheduler) -> None:
    address, procs = scheduler
    d = _zoo(tmp_path, 8)
    arch = f"{tmp_path / 'arch.py'}:slow"
    # 1. a worker killed mid-sweep: its task moves to the other worker, no row is lost
    out = tmp_path / "out1"
    result = {}
    sweep = threading.Thread(
        target=lambda: result.update(df=run(d, "inspect", out=out, arch=arch, scheduler=address))
    )
    sweep.start()
    before = _wait_for_parts(out, 2)
    assert 2 <= len(before) < 8, before
    procs[1].kill()  # SIGKILL: no goodbye to the scheduler
    sweep.join(120)
    df = result["df"]
    assert len(df) == 8 and (df["verdict"] == "ok").all(), df[["path", "error"]]
    assert df["symmetry_dim"].eq(6).all()
    # 2. the sweep itself killed: finished rows stay; a rerun computes only the rest
    out = tmp_path / "out2"
    code = (
        "import sys; from gaugenet.zoo import run; "
        f"run({str(d)!r}, 'inspect', out={str(out)!r}, arch={arch!r}, scheduler={address!r})"
    )
    driver = subprocess.Popen([sys.executable, "-c", code], env=_env())
    finished = _wait_for_parts(out, 2)
    driver.kill()
    driver.wait()
    assert 2 <= len(finished) < 8, finished
    df = run(d, "inspect", out=out, arch=arch, scheduler=address)
    assert len(df) == 8 and (df["verdict"] == "ok").all()
    assert df.attrs["skipped"] >= len(finished)  # not recomputed ...
    assert df.attrs["skipped"] + df.attrs["computed"] == 8  # ... and the rest computed once
    assert not list((out / ".parts" / "inspect").glob("*.parquet"))  # compacted
    # 3. a changed input is redone, the rest reused
    time.sleep(0.01)
    torch.manual_seed(99)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    save_file(net.state_dict(), str(d / "m0.safetensors"))
    again = run(d, "inspect", out=out, arch=arch, scheduler=address)
    assert again.attrs["computed"] == 1 and again.attrs["skipped"] == 7
    changed = again["path"] == str(d / "m0.safetensors")
    assert again.loc[changed, "content_hash"].item() != df.loc[changed, "content_hash"].item()
