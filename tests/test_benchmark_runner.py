"""`make bench` runs `benchmarks/run_all.py`: it must exist and know every benchmark script."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)


def test_make_bench_names_an_existing_script() -> None:
    make = (ROOT / "Makefile").read_text()
    target = re.search(r"^bench:.*\n\t(.*)$", make, re.M)
    assert target is not None
    scripts = re.findall(r"benchmarks/\w+\.py", target.group(1))
    assert scripts and all((ROOT / s).is_file() for s in scripts)


def test_every_script_with_a_command_line_is_run_or_named_a_helper() -> None:
    mains = {
        p.stem
        for p in (ROOT / "benchmarks").glob("*.py")
        if '__name__ == "__main__"' in p.read_text()
    }
    known = set(run_all.BENCHMARKS) | set(run_all.HELPERS)
    assert mains - known == set(), "benchmarks that make bench would not run"
    assert known - mains == set(), "names without a script"
    assert not set(run_all.BENCHMARKS) & set(run_all.HELPERS)


def test_peer_benchmarks_are_skipped_with_the_reason(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--only", "decoder_paired",
         "quantize_transformers", "--logs", str(tmp_path)],
        env={"GAUGENET_PEERS": str(tmp_path / "none"), "PATH": ""},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if "skipped" in line]
    assert len(lines) == 2 and all(
        "no peer environment brevitas, llmcompressor" in x for x in lines
    )
    assert list(tmp_path.iterdir()) == []  # nothing ran
