"""`gaugenet quantize MODEL --scheme w4a8 --out FILE`: round-to-nearest fake quantization,
optionally after equalization within the gauge group (kept only where it helps). A sharded
safetensors folder is streamed layer by layer (see `gaugenet.stream`)."""

from __future__ import annotations

from pathlib import Path

import typer
from torch import nn

from .._errors import GaugeError
from ..io import check_writable, load_model, save_safetensors_atomic
from ._app import app
from ._model_args import ARCH_HELP, INPUT_SHAPE_HELP, MODEL_HELP, parse_shape, sample_inputs
from ._output import emit_json, handled, progress, stdout_console

SCHEME_HELP = (
    "w<bits>[t|g<size>][a<bits>]: weights per channel (default), per tensor (t) or per group "
    "of <size> inputs (g), activations per token with a<bits>; e.g. w4, w4g128, w8a8, w4a8."
)


@app.command()
def quantize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(
        ...,
        "--out",
        help="The safetensors file to write (rounded weights; a folder for a sharded input).",
    ),
    scheme: str = typer.Option("w4", "--scheme", help=SCHEME_HELP),
    equalize: bool = typer.Option(
        False, "--equalize", help="Move within the gauge group first (per-tensor/per-channel)."
    ),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: str = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT, even the input file."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Quantize MODEL under SCHEME, write the rounded weights to OUT, and print the output
    SQNR on 16 sample inputs. The weights are checked to lie on the scheme's grid before
    anything is written; with --equalize the equalized model is kept only where it raises
    the SQNR."""
    from ..stream import is_sharded

    if is_sharded(model):  # a sharded safetensors folder: streamed layer by layer
        from ._stream import stream_command

        kw = dict(arch=arch, input_shape=input_shape, force=force, json_=json_)
        return stream_command("quantize", model, out, scheme=scheme, equalize=equalize, **kw)
    from ..apply import QuantScheme, sqnr_db
    from ..apply import equalize as eq
    from ..apply import quantize as quant
    from ..apply._metrics import first_tensor

    with handled(), progress() as bar:
        sch = QuantScheme.parse(scheme)
        check_writable(out, force=force, source=model)
        task = bar.add_task("loading the model", total=None)
        net = load_model(model, arch).eval()
        x = sample_inputs(net, 16, shape=parse_shape(input_shape))
        try:
            y = first_tensor(net, x)
        except Exception as exc:  # the model's own error, whatever its type: said as ours
            raise GaugeError(
                f"running {type(net).__name__} on 16 sample inputs failed ({exc}); pass "
                "--input-shape"
            ) from exc
        bar.update(task, description=f"quantizing ({sch})")
        q = quant(net, sch)
        before = after = sqnr_db(y, first_tensor(q, x))
        if equalize:
            bar.update(task, description="equalizing")
            moved = eq(net, x, bits=sch.weight_bits, objective="output", scheme=sch)
            q_eq = quant(moved, sch)
            after = sqnr_db(y, first_tensor(q_eq, x))
            if after > before:
                q = q_eq
        _check_on_grid(q, sch)
        bar.update(task, description=f"writing {out}")
        save_safetensors_atomic(
            dict(q.state_dict()), out, force=force, source=model if Path(model).exists() else None
        )
    kept = equalize and after > before
    if json_:
        emit_json(
            {
                "out": str(out),
                "scheme": str(sch),
                "sqnr_db": before,
                "sqnr_equalized_db": after if equalize else None,
                "equalized": kept,
                "inputs": 16,
            }
        )
        return
    msg = f"wrote {out} ({sch}); output SQNR on 16 sample inputs: {before:.2f} dB"
    if equalize:
        msg += f", {after:.2f} dB with equalization ({'kept' if kept else 'not kept: no gain'})"
    stdout_console().print(msg)


def _check_on_grid(model: nn.Module, scheme) -> None:
    """Refuse to write weights that rounding again would move: they are not on the grid."""
    from ..apply._quantize import quantized_params, transposed_params
    from ..apply._schemes import round_weight

    transposed = transposed_params(model)
    for n in quantized_params(model):
        p = model.get_parameter(n).detach()
        again = round_weight(p, scheme, n in transposed)
        if not bool(((again - p).abs() <= 1e-6 * p.abs().max().clamp_min(1e-30)).all()):
            raise GaugeError(f"internal error: {n} is not on the {scheme} grid after rounding")
