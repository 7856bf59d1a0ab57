"""`gaugenet quantize MODEL --scheme w4a8 --out FILE`: round-to-nearest fake quantization,
optionally after equalization within the gauge group (kept only where it helps)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from .._errors import GaugeError
from ..io import check_writable, load_model, save_safetensors_atomic
from ._app import app
from ._model_args import INPUT_SHAPE_HELP, parse_shape, sample_inputs

SCHEME_HELP = (
    "w<bits>[t|g<size>][a<bits>]: weights per channel (default), per tensor (t) or per group "
    "of <size> inputs (g), activations per token with a<bits>; e.g. w4, w4g128, w8a8, w4a8."
)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="HF folder, weights file (+ --arch) or module:factory."),
    out: Path = typer.Option(..., "--out", help="The safetensors file to write (rounded weights)."),
    scheme: str = typer.Option("w4", "--scheme", help=SCHEME_HELP),
    equalize: bool = typer.Option(
        False, "--equalize", help="Move within the gauge group first (per-tensor/per-channel)."
    ),
    arch: str = typer.Option(None, "--arch", help="module:factory for a weights file."),
    input_shape: str = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT, even the input file."),
) -> None:
    """Quantize MODEL under SCHEME, write the rounded weights to OUT (the scheme is stored in
    the file's metadata), and print the output SQNR on 16 sample inputs."""
    from ..apply import QuantScheme, sqnr_db
    from ..apply import equalize as eq
    from ..apply import quantize as quant
    from ..apply._metrics import first_tensor
    from ..apply._quantize import quantized_params

    console = Console(stderr=True)
    try:
        sch = QuantScheme.parse(scheme)
        check_writable(out, force=force, source=model)
        net = load_model(model, arch).eval()
        x = sample_inputs(net, 16, shape=parse_shape(input_shape))
        y = first_tensor(net, x)
        q = quant(net, sch)
        before = after = sqnr_db(y, first_tensor(q, x))
        if equalize:
            if sch.granularity == "per-group":
                raise GaugeError("--equalize aims at per-tensor or per-channel weights")
            moved = eq(
                net, x, bits=sch.weight_bits, granularity=sch.granularity, objective="output"
            )
            q_eq = quant(moved, sch)
            after = sqnr_db(y, first_tensor(q_eq, x))
            if after > before:
                q = q_eq
        state = dict(q.state_dict())
        _check_on_grid(q, quantized_params(q), sch)
        save_safetensors_atomic(
            state, out, force=force, source=model if Path(model).exists() else None
        )
    except GaugeError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    msg = f"wrote {out} ({sch}); output SQNR on 16 sample inputs: {before:.2f} dB"
    if equalize:
        kept = "kept" if after > before else "not kept: no gain"
        msg += f", {after:.2f} dB with equalization ({kept})"
    Console().print(msg)


def _check_on_grid(model, names: list[str], scheme) -> None:
    """Refuse to write weights that rounding again would move: they are not on the grid."""
    from ..apply._schemes import _round_weight

    for n in names:
        p = model.get_parameter(n).detach()
        again = _round_weight(p, scheme)
        if not bool(((again - p).abs() <= 1e-6 * p.abs().max().clamp_min(1e-30)).all()):
            raise GaugeError(f"internal error: {n} is not on the {scheme} grid after rounding")
