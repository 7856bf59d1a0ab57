"""`gaugenet inspect MODEL`: the gauge factors, the breakers and (optionally) a certificate."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from .._errors import GaugeError
from ..io import load_model
from ._app import app
from ._certify_report import CERTIFY_HELP, certify_and_report
from ._model_args import INPUT_SHAPE_HELP, parse_shape, sample_inputs, spinner


@app.command()
def inspect(
    model: str = typer.Argument(..., help="HF folder, weights file (+ --arch) or module:factory."),
    arch: str = typer.Option(None, "--arch", help="module:factory for a weights file."),
    input_shape: str = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    certify_: bool = typer.Option(False, "--certify", help=CERTIFY_HELP),
    n_inputs: int = typer.Option(256, "--inputs", help="Sample inputs for --certify."),
    memory_gb: float = typer.Option(3.0, "--memory-budget", help="GB --certify may use."),
) -> None:
    """Print the gauge factors (kind, dim, modules) and the operations that break symmetries.

    With --certify the exit code carries the verdict: 0 complete, 3 incomplete or not
    proven complete, 4 wrong factors (2 on errors).
    """
    from .. import symmetries

    console = Console()
    try:
        with spinner(console) as progress:
            task = progress.add_task("loading the model", total=None)
            net = load_model(model, arch)
            x = sample_inputs(net, 4, shape=parse_shape(input_shape))
            progress.update(task, description="discovering symmetries")
            group = symmetries(net, x)
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
    if certify_:
        code = certify_and_report(
            console,
            net,
            group,
            n_inputs=n_inputs,
            input_shape=input_shape,
            memory_budget_gb=memory_gb,
        )
        raise typer.Exit(code=code)
