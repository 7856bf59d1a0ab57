"""Every row of the README's "Bad inputs" table: the command exits with code 2 and one line
`error: ...` naming the fix, never a traceback; nothing is written."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gaugenet.cli._app import _register, app

_register()

ARCH = """
import torch
from torch import nn
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
def empty():
    return nn.Sequential()
def integer():
    m = net()
    for p in m.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(torch.int32)
    return m
def zero_width():
    return nn.Sequential(nn.Linear(4, 0), nn.ReLU(), nn.Linear(0, 3))
def nan():
    m = net()
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    return m
def not_a_module():
    return 3
"""


@pytest.fixture
def where(tmp_path):
    (tmp_path / "arch.py").write_text(ARCH)
    torch.manual_seed(0)
    torch.save(
        nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).state_dict(), tmp_path / "w.pt"
    )
    torch.save(nn.Linear(4, 5).state_dict(), tmp_path / "other.pt")
    torch.save({"model": nn.Linear(4, 5)}, tmp_path / "pickled.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    (tmp_path / "plain").mkdir()
    return tmp_path


def _refused(args: list[str], match: str) -> str:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def _out(where) -> list[str]:
    return ["--out", str(where / "out.safetensors")]


# (id, arguments with {d} the test folder, the words the error must contain)
ROWS = [
    ("empty model", ["inspect", "{d}/arch.py:empty"], "has no parameters"),
    ("integer weights", ["inspect", "{d}/arch.py:integer"], "dtype torch.int32"),
    ("zero-width layer", ["inspect", "{d}/arch.py:zero_width"], "layer of zero width"),
    ("NaN weights", ["inspect", "{d}/arch.py:nan"], "non-finite"),
    ("not a module", ["inspect", "{d}/arch.py:not_a_module"], "not a torch.nn.Module"),
    (
        "huge input shape",
        ["inspect", "{d}/arch.py:net", "--input-shape", "100000,100000,100000"],
        "give the shape of one input without the batch",
    ),
    ("bad input shape", ["inspect", "{d}/arch.py:net", "--input-shape", "a,b"], "integers"),
    ("zero in input shape", ["inspect", "{d}/arch.py:net", "--input-shape", "1,0"], "positive"),
    ("missing file", ["inspect", "{d}/nope.pt", "--arch", "{d}/arch.py:net"], "does not exist"),
    ("weights without --arch", ["inspect", "{d}/w.pt"], "pass the architecture as --arch"),
    (
        "weights of another model",
        ["inspect", "{d}/other.pt", "--arch", "{d}/arch.py:net"],
        "does not match",
    ),
    ("pickled objects", ["inspect", "{d}/pickled.pt", "--arch", "{d}/arch.py:net"], "weights-only"),
    (
        "corrupt safetensors",
        ["inspect", "{d}/junk.safetensors", "--arch", "{d}/arch.py:net"],
        "not a readable safetensors",
    ),
    ("broken HF folder", ["inspect", "{d}/hf"], "cannot load the Hugging Face model"),
    ("folder without config", ["inspect", "{d}/plain"], "without config.json"),
    ("unknown factory", ["inspect", "{d}/arch.py:nope"], "has no attribute"),
    ("unknown module", ["inspect", "no_such_module_xyz:net"], "cannot import"),
    (
        "unknown gauge",
        ["canonicalize", "{d}/arch.py:net", "--gauge", "nice", "--out", "{d}/o.safetensors"],
        "--gauge 'nice'",
    ),
    (
        "unknown granularity",
        ["equalize", "{d}/arch.py:net", "--granularity", "x", "--out", "{d}/o.safetensors"],
        "--granularity 'x'",
    ),
    (
        "output is the input",
        ["canonicalize", "{d}/w.pt", "--arch", "{d}/arch.py:net", "--out", "{d}/w.pt"],
        "is the input file",
    ),
    ("output exists", ["canonicalize", "{d}/arch.py:net", "--out", "{d}/w.pt"], "already exists"),
    (
        "output is a folder",
        ["canonicalize", "{d}/arch.py:net", "--out", "{d}/plain"],
        "is a folder",
    ),
    (
        "output folder missing",
        ["canonicalize", "{d}/arch.py:net", "--out", "{d}/no/o.safetensors"],
        "does not exist",
    ),
    ("report exists", ["reproduce", "--out", "{d}/plain", "--only", "ff.*"], "already exists"),
]


@pytest.mark.parametrize(("name", "args", "match"), ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(where, name, args, match) -> None:
    if name == "report exists":
        (where / "plain" / "report.md").write_text("an earlier report")
    _refused([a.replace("{d}", str(where)) for a in args], match)
    assert not (where / "o.safetensors").exists()


def test_read_only_output_folder(where, monkeypatch) -> None:
    """Checked before the work (the folder's permissions) and at the write itself (a
    read-only file system, or permissions checks that `os.access` cannot see)."""
    out = ["canonicalize", f"{where}/arch.py:net", "--out", f"{where}/o.safetensors"]
    with monkeypatch.context() as m:
        m.setattr("gaugenet.io._save.os.access", lambda *a: False)
        _refused(out, "is not writable")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("gaugenet.io._save.tempfile.mkstemp", denied)
    _refused(out, "cannot create a file in")
    assert not (where / "o.safetensors").exists()


def test_bits_out_of_range(where) -> None:
    r = CliRunner().invoke(
        app, ["equalize", f"{where}/arch.py:net", "--bits", "1", "--out", f"{where}/o.st"]
    )
    assert r.exit_code == 2 and "Traceback" not in r.output and "--bits" in r.output
