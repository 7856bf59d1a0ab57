"""`gaugenet equalize MODEL --bits 4 --out FILE`: weights moved within the gauge group to where
round-to-nearest quantization loses least; the function is unchanged (checked)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from .._errors import GaugeError
from ..io import check_writable, load_model, save_safetensors_atomic
from ._app import app
from ._model_args import INPUT_SHAPE_HELP, parse_shape, sample_inputs


@app.command()
def equalize(
    model: str = typer.Argument(..., help="HF folder, weights file (+ --arch) or module:factory."),
    out: Path = typer.Option(..., "--out", help="The safetensors file to write."),
    bits: int = typer.Option(4, "--bits", help="Integer width the weights will be rounded to."),
    granularity: str = typer.Option(
        "per-tensor", "--granularity", help="per-tensor or per-channel."
    ),
    arch: str = typer.Option(None, "--arch", help="module:factory for a weights file."),
    input_shape: str = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT, even the input file."),
) -> None:
    """Equalize MODEL for BITS-bit weights, write OUT, and print the SQNR before and after."""
    from ..apply import equalize as eq
    from ..apply import quantize_weights, sqnr_db
    from ..apply._metrics import first_tensor

    console = Console()
    try:
        check_writable(out, force=force, source=model)
        net = load_model(model, arch).eval()
        x = sample_inputs(net, 16, shape=parse_shape(input_shape))
        new = eq(net, x, bits=bits, granularity=granularity, objective="output")
        y = first_tensor(net, x)
        before = sqnr_db(y, first_tensor(quantize_weights(net, bits, granularity), x))
        after = sqnr_db(y, first_tensor(quantize_weights(new, bits, granularity), x))
        if after < before:
            raise GaugeError(
                f"equalization lowered the output SQNR ({before:.2f} -> {after:.2f} dB); "
                "nothing written"
            )
        save_safetensors_atomic(
            new.state_dict(), out, force=force, source=model if Path(model).exists() else None
        )
    except GaugeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    console.print(
        f"wrote {out}; output SQNR with {bits}-bit {granularity} weights on 16 sample inputs: "
        f"{before:.2f} dB before, {after:.2f} dB after equalization"
    )
