"""The command line in scripts: `python -m gaugenet`, `--version`, `--json` on stdout with
progress and errors on stderr, untruncated names when piped, `reproduce --force`, and no
temporary file left behind when a write is interrupted by SIGTERM or SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gaugenet import __version__
from gaugenet.cli._app import _register, app
from gaugenet.reproduce import Measurement
from gaugenet.reproduce._registry import Claim

_register()
SRC = str(Path(__file__).resolve().parents[1] / "src")
LONG = "a_layer_whose_name_is_much_longer_than_any_terminal_column_would_allow"
ARCH = f"""
from collections import OrderedDict
import torch
from torch import nn
def net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("{LONG}", nn.Linear(4, 6)), ("act", nn.ReLU()), ("head", nn.Linear(6, 3))]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def spec(tmp_path) -> str:
    (tmp_path / "arch.py").write_text(ARCH)
    return f"{tmp_path / 'arch.py'}:net"


def test_python_m_and_version() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gaugenet", "--version"], capture_output=True, text=True, env=_env()
    )
    assert r.returncode == 0 and r.stdout.strip() == f"gaugenet {__version__}", r.stderr
    r = CliRunner().invoke(app, ["inspect", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "--input-shape" in r.output and "path/to/file.py:factory" in r.output


def test_json_and_untruncated_names(spec, tmp_path) -> None:
    r = CliRunner().invoke(app, ["inspect", spec, "--json", "--certify", "--inputs", "64"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)  # stdout holds the JSON document and nothing else
    names = {f["name"] for f in result["factors"]}
    assert names == {f"scale:{LONG}", f"perm:{LONG}"}
    assert result["dim"] == 6 and result["certify"]["unexplained"] == 0
    # piped (not a terminal): the table is as wide as its longest name
    r = CliRunner().invoke(app, ["inspect", spec])
    assert r.exit_code == 0 and f"scale:{LONG}" in r.stdout and f"perm:{LONG}" in r.stdout
    for cmd in (["canonicalize", spec], ["equalize", spec, "--bits", "4"]):
        out = tmp_path / f"{cmd[0]}.safetensors"
        r = CliRunner().invoke(app, [*cmd, "--out", str(out), "--json"])
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)
        assert result["out"] == str(out) and 0 <= result["drift"] < 1e-5
        assert set(load_file(str(out))) == {
            f"{LONG}.weight",
            f"{LONG}.bias",
            "head.weight",
            "head.bias",
        }
        umask = os.umask(0)
        os.umask(umask)
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def _claim(value: float) -> Claim:
    return Claim("test.c", "none", "s", "m", 1.0, "max", 0.0, lambda ctx: Measurement(value, "d"))


def test_reproduce_refuses_to_overwrite_a_report(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("gaugenet.reproduce._report.all_claims", lambda: [_claim(0.5)])
    monkeypatch.setattr("gaugenet.cli._reproduce.all_claims", lambda: [_claim(0.5)])
    args = ["reproduce", "--out", str(tmp_path)]
    assert CliRunner().invoke(app, args).exit_code == 0
    (tmp_path / "report.md").write_text("kept")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "use --force" in r.stderr
    assert (tmp_path / "report.md").read_text() == "kept"
    r = CliRunner().invoke(app, [*args, "--force"])
    assert r.exit_code == 0 and (tmp_path / "report.md").read_text() != "kept"


SLOW_SAVE = """
import sys, time
import safetensors.torch
import torch
from gaugenet.io import save_safetensors_atomic

def slow(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"x" * 100_000)  # half a file
    print("writing", flush=True)
    time.sleep(60)

safetensors.torch.save_file = slow
save_safetensors_atomic({"w": torch.zeros(3)}, sys.argv[1])
"""


def test_sigterm_during_save_removes_the_temporary_file(tmp_path) -> None:
    (tmp_path / "slow.py").write_text(textwrap.dedent(SLOW_SAVE))
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "slow.py"), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        tmp = list(tmp_path.glob(".out.safetensors.*.tmp"))
        assert len(tmp) == 1 and tmp[0].stat().st_size == 100_000  # it was there
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM  # it still ends as SIGTERM ends it
    assert not list(tmp_path.glob(".out.safetensors.*")) and not out.exists()


def test_sigint_during_save_removes_the_temporary_file(tmp_path, monkeypatch) -> None:
    from gaugenet.io import save_safetensors_atomic

    seen = []

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x" * 1000)
        seen.append(Path(filename).exists())
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    # Python's own Ctrl-C handler, whatever this process inherited (a job started in the
    # background without job control ignores SIGINT)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_safetensors_atomic({"w": torch.zeros(3)}, tmp_path / "out.safetensors")
        assert seen == [True] and list(tmp_path.iterdir()) == []
        # the handler is restored
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_ignored_sigint_during_save_leaves_the_write_alone(tmp_path, monkeypatch) -> None:
    """A process that ignores SIGINT keeps ignoring it while saving: the file is written.
    (Removing the temporary file there turned an ignored Ctrl-C into a failed write.)"""
    from safetensors.torch import save_file

    from gaugenet.io import save_safetensors_atomic

    def interrupted(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        save_safetensors_atomic({"w": torch.ones(3)}, tmp_path / "out.safetensors")
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_save_in_a_thread_and_errors_clean_up(tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from gaugenet import GaugeError
    from gaugenet.io import save_safetensors_atomic

    out = tmp_path / "t.safetensors"
    with ThreadPoolExecutor(1) as pool:  # no signal handlers there: still written
        pool.submit(save_safetensors_atomic, {"w": torch.ones(2)}, out).result()
    assert torch.equal(load_file(str(out))["w"], torch.ones(2))
    with pytest.raises(GaugeError, match="already exists"):
        save_safetensors_atomic({"w": torch.ones(2)}, out)
    with pytest.raises(Exception):  # noqa: B017 - a tensor safetensors cannot store
        save_safetensors_atomic({"w": torch.ones(2).to_sparse()}, tmp_path / "s.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
