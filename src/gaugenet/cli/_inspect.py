"""`gaugenet inspect MODEL`: the gauge factors, the breakers and (optionally) a certificate."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from .._errors import GaugeError
from ..io import load_model
from ._app import app
from ._model_args import INPUT_SHAPE_HELP, parse_shape, sample_inputs, spinner


@app.command()
def inspect(
    model: str = typer.Argument(..., help="HF folder, weights file (+ --arch) or module:factory."),
    arch: str = typer.Option(None, "--arch", help="module:factory for a weights file."),
    input_shape: str = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    certify_: bool = typer.Option(False, "--certify", help="Compare with the Jacobian's rank."),
    n_inputs: int = typer.Option(256, "--inputs", help="Sample inputs for --certify."),
) -> None:
    """Print the gauge factors (kind, dim, modules) and the operations that break symmetries."""
    from .. import certify, symmetries

    console = Console()
    try:
        with spinner(console) as progress:
            task = progress.add_task("loading the model", total=None)
            net = load_model(model, arch)
            x = sample_inputs(net, 4, shape=parse_shape(input_shape))
            progress.update(task, description="discovering symmetries")
            group = symmetries(net, x)
            report = None
            if certify_:
                progress.update(task, description="certifying (Jacobian rank)")
                report = certify(
                    net.double(),
                    sample_inputs(net.double(), n_inputs, shape=parse_shape(input_shape)),
                    group=group,
                )
    except GaugeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    table = Table(title=f"gauge factors of {model} (dim {group.dim})")
    for col in ("factor", "kind", "dim", "modules"):
        table.add_column(col)
    for name, kind, dim, modules in group.summary():
        table.add_row(name, kind, str(dim), ", ".join(modules))
    console.print(table)
    console.print(f"breakers ({len(group.breakers)}):")
    for b in group.breakers:
        console.print(f"  {b.node}: {b.reason}")
    if report is not None:
        console.print("certification:")
        for line in report.lines():
            console.print(f"  {line}")
