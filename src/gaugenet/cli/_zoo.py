"""`gaugenet zoo {inspect,canonicalize,certify,equalize} ZOO --out RESULTS`: one task over
every checkpoint of a folder or glob, in parallel on Dask, into a resumable Parquet table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .._errors import GaugeError
from ._app import app
from ._model_args import INPUT_SHAPE_HELP, parse_shape

zoo_app = typer.Typer(
    help="Run one task over a zoo of checkpoints on Dask; results in RESULTS/<task>.parquet.",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")

_ZOO = typer.Argument(..., help="A folder of checkpoints or a glob such as 'runs/*/model.pt'.")
_OUT = typer.Option(..., "--out", help="Results folder (table, written weights, parts).")
_ARCH = typer.Option(
    None, "--arch", help="Weights files: a built-in name, path/file.py:factory or module:factory."
)
_WORKERS = typer.Option(2, "--workers", help="Local worker processes (1 thread each).")
_SCHED = typer.Option(
    None, "--scheduler", help="Address of a running Dask scheduler to use instead."
)
_MEM = typer.Option("2GiB", "--memory-limit", help="Memory per local worker ('none': no limit).")
_SHAPE = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP)


def _task(cls, *options):
    """The task with its options, or a clean exit saying which option is wrong."""
    try:
        return cls(*options)
    except GaugeError as exc:
        Console().print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None


def _sweep(zoo: str, task, out: Path, arch, workers, scheduler, memory_limit, input_shape) -> None:
    from ..zoo import run

    console = Console()
    try:
        df = run(
            zoo,
            task,
            out=out,
            arch=arch,
            workers=workers,
            scheduler=scheduler,
            memory_limit=None if memory_limit.lower() == "none" else memory_limit,
            input_shape=parse_shape(input_shape),
            progress=True,
        )
    except GaugeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    table = Table(title=f"{task.signature}: {len(df)} checkpoints")
    table.add_column("verdict")
    table.add_column("checkpoints", justify="right")
    for verdict, n in df["verdict"].value_counts().sort_index().items():
        table.add_row(str(verdict), str(n))
    console.print(table)
    computed, seconds = df.attrs["computed"], df.attrs["seconds"]
    rate = f"{computed / seconds:.2f} checkpoints/s" if computed else "nothing to compute"
    console.print(
        f"{computed} computed, {df.attrs['skipped']} reused from an earlier run ({rate}); "
        f"table: {out / (task.name + '.parquet')}"
    )
    for _, row in df[df["verdict"] == "error"].head(5).iterrows():
        console.print(f"  [red]error[/red] {row['path']}: {row['error']}")


@zoo_app.command("inspect")
def inspect_(
    zoo: str = _ZOO, out: Path = _OUT, arch: str = _ARCH, workers: int = _WORKERS,
    scheduler: str = _SCHED, memory_limit: str = _MEM, input_shape: str = _SHAPE,
) -> None:  # fmt: skip
    """Gauge group dimension, factors and breakers of every checkpoint."""
    from ..zoo import Inspect

    _sweep(zoo, Inspect(), out, arch, workers, scheduler, memory_limit, input_shape)


@zoo_app.command("canonicalize")
def canonicalize_(
    zoo: str = _ZOO, out: Path = _OUT, arch: str = _ARCH, workers: int = _WORKERS,
    scheduler: str = _SCHED, memory_limit: str = _MEM, input_shape: str = _SHAPE,
    gauge: str = typer.Option("balanced", "--gauge", help="balanced or unit_in."),
) -> None:  # fmt: skip
    """Canonical weights of every checkpoint (RESULTS/canonicalize/), with the output drift."""
    from ..zoo import Canonicalize

    _sweep(
        zoo, _task(Canonicalize, gauge), out, arch, workers, scheduler, memory_limit, input_shape
    )


@zoo_app.command("certify")
def certify_(
    zoo: str = _ZOO, out: Path = _OUT, arch: str = _ARCH, workers: int = _WORKERS,
    scheduler: str = _SCHED, memory_limit: str = _MEM, input_shape: str = _SHAPE,
    n_inputs: int = typer.Option(0, "--inputs", help="Inputs (0: 3× params/outputs)."),
) -> None:  # fmt: skip
    """The Jacobian-rank certificate of every checkpoint (float64)."""
    from ..zoo import Certify

    _sweep(zoo, _task(Certify, n_inputs), out, arch, workers, scheduler, memory_limit, input_shape)


@zoo_app.command("equalize")
def equalize_(
    zoo: str = _ZOO, out: Path = _OUT, arch: str = _ARCH, workers: int = _WORKERS,
    scheduler: str = _SCHED, memory_limit: str = _MEM, input_shape: str = _SHAPE,
    bits: int = typer.Option(4, "--bits", help="Integer width the weights will be rounded to."),
    granularity: str = typer.Option("per-tensor", "--granularity", help="per-tensor/per-channel"),
) -> None:  # fmt: skip
    """Weights of every checkpoint equalized for BITS-bit quantization (RESULTS/equalize/)."""
    from ..zoo import Equalize

    task = _task(Equalize, bits, granularity)
    _sweep(zoo, task, out, arch, workers, scheduler, memory_limit, input_shape)
