"""Running the registered claims and writing `report.md`."""

from __future__ import annotations

import fnmatch
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ._registry import Claim, Context, Measurement, all_claims

__all__ = ["Outcome", "run_claims", "write_report"]


@dataclass
class Outcome:
    claim: Claim
    measurement: Measurement | None
    #: the criterion holds (for a figure: its target is met)
    met: bool
    seconds: float
    error: str = ""

    @property
    def passed(self) -> bool:
        """A claim passes when its criterion holds; a figure when it was measured."""
        if self.claim.kind == "figure":
            return self.measurement is not None
        return self.met

    @property
    def verdict(self) -> str:
        if self.claim.kind == "figure" and self.measurement is not None:
            return "target met" if self.met else "target missed"
        return "PASS" if self.met else "FAIL"


def run_claims(
    out_dir: Path, *, only: str | None = None, seed: int = 0, on_done=None
) -> list[Outcome]:
    """Run every claim whose id matches the glob `only` (all when `None`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(out_dir=out_dir, seed=seed)
    claims = [c for c in all_claims() if only is None or fnmatch.fnmatch(c.id, only)]
    outcomes = []
    for c in claims:
        start = time.perf_counter()
        try:
            m = c.fn(ctx)
            outcome = Outcome(c, m, c.passed(float(m.value)), time.perf_counter() - start)
        except Exception:  # a crashing claim is a failed claim, reported with its traceback
            outcome = Outcome(c, None, False, time.perf_counter() - start, traceback.format_exc())
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)
    return outcomes


def _row(o: Outcome, out_dir: Path) -> str:
    value = "error" if o.measurement is None else f"{o.measurement.value:.3e}"
    detail = o.measurement.detail if o.measurement else o.error.strip().splitlines()[-1]
    figs = ""
    if o.measurement and o.measurement.figures:
        figs = " ".join(
            f"[{Path(f).name}]({Path(f).resolve().relative_to(out_dir.resolve())})"
            for f in o.measurement.figures
        )
    cells = [
        o.claim.id,
        o.claim.reference,
        o.claim.statement,
        o.claim.measured,
        value,
        o.claim.criterion(),
        o.verdict,
        (detail + (" " + figs if figs else "")).replace("|", "\\|"),
    ]
    return "| " + " | ".join(cells) + " |"


def write_report(outcomes: list[Outcome], out_dir: Path) -> Path:
    """Write `out_dir/report.md` atomically and return its path."""
    claims = [o for o in outcomes if o.claim.kind == "claim"]
    figures_ = [o for o in outcomes if o.claim.kind == "figure"]
    n_pass = sum(o.passed for o in claims)
    n_met = sum(o.met for o in figures_)
    lines = [
        "# gaugenet: reproduction report",
        "",
        'Claims of "Unification of Symmetries Inside Neural Networks: Transformer, '
        'Feedforward and Neural ODE" (arXiv:2402.02362), each measured numerically.',
        "",
        f"**{n_pass} of {len(claims)} claims pass.** "
        f"{n_met} of {len(figures_)} engineering targets (reported figures) are met.",
        "",
        "| id | paper | claim | measured | value | criterion | result | detail |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(o, out_dir) for o in outcomes),
        "",
    ]
    loose = [o for o in outcomes if o.claim.loose]
    if loose:
        lines += [
            "## Where the paper is loose",
            "",
            "Each place is measured by the claim named, whose counterexample is in its row above.",
            "",
            *(
                f"- **{o.claim.reference}** ({o.claim.id}, {o.verdict}): {o.claim.loose}"
                for o in loose
            ),
            "",
        ]
    figures = [f for o in outcomes if o.measurement for f in o.measurement.figures]
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            rel = Path(f).resolve().relative_to(out_dir.resolve())
            lines += [f"![{rel}]({rel})", ""]
    failures = [o for o in outcomes if o.error]
    if failures:
        lines += ["## Errors", ""]
        for o in failures:
            lines += [f"### {o.claim.id}", "", "```", o.error.strip(), "```", ""]
    path = out_dir / "report.md"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".report.", suffix=".md")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, path)
    return path
