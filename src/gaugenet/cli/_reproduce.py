"""`gaugenet reproduce`: measure every registered claim of the paper."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .._errors import GaugeError
from ..reproduce import all_claims, run_claims, write_report
from ._app import app
from ._output import handled, stdout_console


def _check_out(out: Path, force: bool) -> None:
    """Refuse an OUT that is a file, or that holds a report already (unless `force`)."""
    if out.exists() and not out.is_dir():
        raise GaugeError(f"--out {out} is a file; give a folder for report.md and the figures")
    if (out / "report.md").exists() and not force:
        raise GaugeError(
            f"{out / 'report.md'} already exists; refusing to overwrite it (use --force)"
        )
    parent = out if out.is_dir() else out.parent
    if not parent.is_dir():
        raise GaugeError(f"the folder {parent} does not exist: create it first")


@app.command()
def reproduce(
    out: Path = typer.Option(Path("report"), "--out", help="Folder for report.md and figures."),
    only: str = typer.Option(None, "--only", help="Glob over claim ids, e.g. 'ode.*'."),
    seed: int = typer.Option(0, "--seed", help="Seed of every claim's random numbers."),
    list_: bool = typer.Option(False, "--list", help="List the claims and exit."),
    threads: int = typer.Option(
        1, "--threads", min=1, help="Torch CPU threads; the claims are small-matrix work."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing OUT/report.md."),
) -> None:
    """Measure the paper's claims, print a table, write OUT/report.md; exit 1 if any fails,
    2 if OUT holds a report already (without --force)."""
    import torch

    torch.set_num_threads(threads)
    console = stdout_console()
    if list_:
        for c in all_claims():
            console.print(f"{c.id}  ({c.reference})  {c.statement}")
        return
    n = len([c for c in all_claims() if only is None or fnmatch.fnmatch(c.id, only)])
    with handled():
        _check_out(out, force)
        if n == 0:
            raise GaugeError(f"--only {only!r} matches no claim (see --list)")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("measuring claims", total=n)

        def done(o) -> None:
            progress.update(task, advance=1, description=f"{o.claim.id}")

        outcomes = run_claims(out, only=only, seed=seed, on_done=done)
    table = Table(title="gaugenet reproduce")
    table.add_column("id", no_wrap=True)
    for col in ("paper", "value", "criterion", "result"):
        table.add_column(col, no_wrap=col != "paper")
    for o in outcomes:
        value = "error" if o.measurement is None else f"{o.measurement.value:.3e}"
        color = "green" if o.met else ("yellow" if o.passed else "red")
        result = Text(o.verdict, style=color)
        table.add_row(o.claim.id, o.claim.reference, value, o.claim.criterion(), result)
    console.print(table)
    path = write_report(outcomes, out)
    n_fail = sum(not o.passed for o in outcomes)
    missed = [o.claim.id for o in outcomes if o.passed and not o.met]
    console.print(f"{len(outcomes) - n_fail}/{len(outcomes)} pass; report: {path}")
    if missed:
        console.print(f"engineering targets missed (reported, not failures): {', '.join(missed)}")
    if n_fail or not outcomes:
        raise typer.Exit(code=1)
