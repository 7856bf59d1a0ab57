"""`gaugenet canonicalize MODEL --out FILE`: gauge-fixed weights, with the output drift."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.console import Console

from .._errors import GaugeError
from ..io import check_writable, load_model, save_safetensors_atomic
from ._app import app
from ._model_args import INPUT_SHAPE_HELP, parse_shape, sample_inputs, spinner


def _outputs(model: torch.nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    if not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
    return out


@app.command()
def canonicalize(
    model: str = typer.Argument(..., help="HF folder, weights file (+ --arch) or module:factory."),
    out: Path = typer.Option(..., "--out", help="The safetensors file to write."),
    arch: str = typer.Option(None, "--arch", help="module:factory for a weights file."),
    input_shape: str = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    gauge: str = typer.Option("balanced", "--gauge", help="balanced or unit_in."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT, even the input file."),
) -> None:
    """Write the canonical (gauge-fixed) weights of MODEL and report the output drift."""
    from .. import canonicalize as canon

    console = Console()
    try:
        check_writable(out, force=force, source=model)
        with spinner(console) as progress:
            task = progress.add_task("loading the model", total=None)
            net = load_model(model, arch)
            x = sample_inputs(net, 16, shape=parse_shape(input_shape))
            progress.update(task, description="canonicalizing")
            new = canon(net, gauge, example_inputs=x)
            progress.update(task, description="measuring the drift")
            a, b = _outputs(net, x), _outputs(new, x)
            drift = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
            save_safetensors_atomic(
                new.state_dict(), out, force=force, source=model if Path(model).exists() else None
            )
    except GaugeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    console.print(f"wrote {out}; relative output drift on 16 sample inputs: {drift:.3e}")
