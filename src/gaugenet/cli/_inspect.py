"""`gaugenet inspect MODEL`: the discovered gauge factors and the symmetry breakers."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from ..io import load_model
from ._app import app
from ._certify_report import CERTIFY_HELP, EXIT_CODES, run_certify
from ._model_args import ARCH_HELP, INPUT_SHAPE_HELP, MODEL_HELP, parse_shape, sample_inputs
from ._output import emit_json, handled, progress, stdout_console


@app.command()
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: str = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    certify_: bool = typer.Option(False, "--certify", help=CERTIFY_HELP),
    n_inputs: int = typer.Option(256, "--inputs", min=1, help="Sample inputs for --certify."),
    memory_gb: float = typer.Option(3.0, "--memory-budget", help="GB --certify may use."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Print the gauge factors (kind, dim, modules) and the operations that break symmetries.

    With --certify the exit code carries the verdict: 0 complete, 3 incomplete or not
    proven complete, 4 wrong factors (2 on errors).
    """
    from .. import symmetries

    with handled():
        with progress() as bar:
            task = bar.add_task("loading the model", total=None)
            net = load_model(model, arch)
            x = sample_inputs(net, 4, shape=parse_shape(input_shape))
            bar.update(task, description="discovering symmetries")
            group = symmetries(net, x)
        report = None
        if certify_:
            report = run_certify(
                net, group, n_inputs=n_inputs, input_shape=input_shape, memory_budget_gb=memory_gb
            )
    result: dict[str, Any] = {
        "model": model,
        "dim": group.dim,
        "factors": [
            {"name": name, "kind": kind, "dim": dim, "modules": list(modules)}
            for name, kind, dim, modules in group.summary()
        ],
        "breakers": [{"node": b.node, "reason": b.reason} for b in group.breakers],
    }
    code = 0
    if report is not None:
        result["certify"] = report.to_dict()
        code = EXIT_CODES[report.verdict.value]
    if json_:
        emit_json(result)
        raise typer.Exit(code=code)
    console = stdout_console()
    table = Table(title=f"gauge factors of {model} (dim {group.dim})")
    for col in ("factor", "kind", "dim", "modules"):
        table.add_column(col, overflow="fold")
    for f in result["factors"]:
        table.add_row(f["name"], f["kind"], str(f["dim"]), ", ".join(f["modules"]))
    console.print(table)
    console.print(f"breakers ({len(group.breakers)}):")
    for b in group.breakers:
        console.print(f"  {b.node}: {b.reason}")
    if report is not None:
        console.print("certification:")
        for line in report.lines():
            console.print(f"  {line}")
        console.print(f"exit code {code} ({report.verdict.value})")
    raise typer.Exit(code=code)
