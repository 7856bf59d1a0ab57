"""The claim registry and the report."""

from __future__ import annotations

import math

from typer.testing import CliRunner

from gaugenet.cli import app
from gaugenet.cli._app import _register
from gaugenet.reproduce import Measurement, all_claims, run_claims, write_report
from gaugenet.reproduce._registry import _REGISTRY, Claim


def _fake(kind: str, value: float, tol: float = 1.0, compare: str = "max") -> Claim:
    return Claim(
        f"test.{kind}.{value}",
        "none",
        "s",
        "m",
        tol,
        compare,
        0.0,
        lambda ctx: Measurement(value, "detail"),
        kind,
    )


def test_every_part_of_the_paper_is_registered():
    ids = [c.id for c in all_claims()]
    assert len(ids) == len(set(ids)) >= 50
    prefixes = {i.split(".")[0] for i in ids}
    assert prefixes >= {"ff", "ode", "linear_ode", "attn", "reg", "dyn", "disc", "apply"}


def test_criteria():
    assert _fake("claim", 0.5).passed(0.5)
    assert not _fake("claim", 2.0).passed(2.0)
    assert not _fake("claim", 0.0).passed(math.nan)
    near = Claim("x", "r", "s", "m", 0.2, "near", 2.0, lambda c: None)
    assert near.passed(2.1) and not near.passed(2.3)
    assert Claim("y", "r", "s", "m", 3.0, "min", 0.0, lambda c: None).passed(3.5)


def test_failures_fail_and_missed_targets_are_reported(tmp_path, monkeypatch):
    fakes = [_fake("claim", 0.5), _fake("claim", 2.0), _fake("figure", 2.0)]
    monkeypatch.setattr("gaugenet.reproduce._report.all_claims", lambda: fakes)
    outcomes = run_claims(tmp_path)
    assert [o.passed for o in outcomes] == [True, False, True]
    assert [o.verdict for o in outcomes] == ["PASS", "FAIL", "target missed"]
    text = write_report(outcomes, tmp_path).read_text()
    assert "**1 of 2 claims pass.** 0 of 1 engineering targets" in text
    assert "| FAIL |" in text and "| target missed |" in text


def test_cli_exits_nonzero_on_a_failing_claim(tmp_path, monkeypatch):
    _register()
    fakes = [_fake("claim", 2.0)]
    monkeypatch.setattr("gaugenet.reproduce._report.all_claims", lambda: fakes)
    monkeypatch.setattr("gaugenet.cli._reproduce.all_claims", lambda: fakes)
    result = CliRunner().invoke(app, ["reproduce", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert (tmp_path / "report.md").exists()
    assert "test.claim.2.0" not in _REGISTRY


def test_every_loose_place_of_the_paper_is_a_claim():
    refs = " | ".join(c.reference for c in all_claims() if c.loose)
    for place in ("Theorem 3.1", "(22)", "(24)-(25)", "(26)-(27)", "footnote 9", "App. C"):
        assert place in refs, place


def test_loose_places_are_listed_in_the_report(tmp_path, monkeypatch):
    loose = Claim(
        "test.loose", "eq. (99)", "s", "m", 1.0, "max", 0.0, lambda c: Measurement(0.5), loose="L"
    )
    monkeypatch.setattr(
        "gaugenet.reproduce._report.all_claims", lambda: [loose, _fake("claim", 0.5)]
    )
    text = write_report(run_claims(tmp_path), tmp_path).read_text()
    assert "## Where the paper is loose" in text
    assert "- **eq. (99)** (test.loose, PASS): L" in text
