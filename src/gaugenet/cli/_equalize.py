"""`gaugenet equalize MODEL --bits 4 --out FILE`: weights moved within the gauge group to where
round-to-nearest quantization loses least; the function is unchanged (checked)."""

from __future__ import annotations

from pathlib import Path

import typer

from .._errors import GaugeError
from ..io import check_writable, load_model, save_safetensors_atomic
from ._app import app
from ._model_args import ARCH_HELP, INPUT_SHAPE_HELP, MODEL_HELP, parse_shape, sample_inputs
from ._output import emit_json, handled, progress, stdout_console


@app.command()
def equalize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(
        ..., "--out", help="The safetensors file to write (a folder for a sharded input)."
    ),
    bits: int = typer.Option(
        4, "--bits", min=2, max=16, help="Integer width the weights will be rounded to."
    ),
    granularity: str = typer.Option(
        "per-tensor", "--granularity", help="per-tensor or per-channel."
    ),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: str = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT, even the input file."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Equalize MODEL for BITS-bit weights, write OUT, and print the SQNR before and after.

    The equalized model is checked on 16 sample inputs (relative output change within the
    weights' dtype tolerance) before anything is written; exit code 2 otherwise.
    """
    from ..stream import is_sharded

    if is_sharded(model):  # a sharded safetensors folder: streamed layer by layer
        from ._stream import stream_command

        kw = dict(arch=arch, input_shape=input_shape, force=force, json_=json_)
        return stream_command("equalize", model, out, bits=bits, granularity=granularity, **kw)
    from .. import invariance_error
    from ..apply import equalize as eq
    from ..apply import quantize_weights, sqnr_db
    from ..apply._metrics import first_tensor
    from ..apply._quantize import GRANULARITIES

    with handled():
        if granularity not in GRANULARITIES:
            raise GaugeError(f"--granularity {granularity!r}: use one of {GRANULARITIES}")
        check_writable(out, force=force, source=model)
        with progress() as bar:
            task = bar.add_task("loading the model", total=None)
            net = load_model(model, arch).eval()
            x = sample_inputs(net, 16, shape=parse_shape(input_shape))
            bar.update(task, description="equalizing")
            new = eq(net, x, bits=bits, granularity=granularity, objective="output")
            bar.update(task, description="measuring the quantization noise")
            y = first_tensor(net, x)
            before = sqnr_db(y, first_tensor(quantize_weights(net, bits, granularity), x))
            after = sqnr_db(y, first_tensor(quantize_weights(new, bits, granularity), x))
            if after < before:
                raise GaugeError(
                    f"equalization lowered the output SQNR ({before:.2f} -> {after:.2f} dB); "
                    "nothing written"
                )
            drift = invariance_error(net, new, x)
            bar.update(task, description=f"writing {out}")
            save_safetensors_atomic(
                new.state_dict(), out, force=force, source=model if Path(model).exists() else None
            )
    if json_:
        emit_json(
            {
                "out": str(out),
                "bits": bits,
                "granularity": granularity,
                "sqnr_before_db": before,
                "sqnr_after_db": after,
                "drift": drift,
                "inputs": 16,
            }
        )
        return
    stdout_console().print(
        f"wrote {out}; output SQNR with {bits}-bit {granularity} weights on 16 sample inputs: "
        f"{before:.2f} dB before, {after:.2f} dB after equalization"
    )
