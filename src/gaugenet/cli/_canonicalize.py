"""`gaugenet canonicalize MODEL --out FILE`: gauge-fixed weights, checked before writing."""

from __future__ import annotations

from pathlib import Path

import typer

from .._errors import GaugeError
from .._tolerances import drift_tolerance, model_dtype
from ..io import check_writable, load_model, save_safetensors_atomic
from ._app import app
from ._model_args import ARCH_HELP, INPUT_SHAPE_HELP, MODEL_HELP, parse_shape, sample_inputs
from ._output import emit_json, handled, progress, stdout_console

GAUGES = ("balanced", "unit_in")


@app.command()
def canonicalize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="The safetensors file to write."),
    arch: str = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: str = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    gauge: str = typer.Option("balanced", "--gauge", help="balanced or unit_in."),
    float64: bool = typer.Option(
        False,
        "--float64",
        help="Compute and write float64 weights (for canonical forms that float32 cannot hold).",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT, even the input file."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write the canonical (gauge-fixed) weights of MODEL and report the output drift.

    The canonical form is computed in float64, checked on 16 sample inputs against a
    tolerance set by the weights' dtype (1e-5 relative for float32, 1e-9 for float64),
    cast back and checked again; nothing is written (exit code 2) when it changes the
    outputs. With --float64 the float64 result is written, checked against the tolerance
    of the dtype the weights came in.
    """
    from .. import canonicalize as canon
    from .. import invariance_error

    with handled():
        if gauge not in GAUGES:
            raise GaugeError(f"--gauge {gauge!r}: use one of {', '.join(GAUGES)}")
        check_writable(out, force=force, source=model)
        with progress() as bar:
            task = bar.add_task("loading the model", total=None)
            net = load_model(model, arch)
            # checked against the precision the weights came with, not float64's
            tol = drift_tolerance(model_dtype(net))
            if float64:
                net = net.double()
            x = sample_inputs(net, 16, shape=parse_shape(input_shape))
            bar.update(task, description="canonicalizing")
            new = canon(net, gauge, example_inputs=x, tol=tol)
            drift = invariance_error(net, new, x)
            bar.update(task, description=f"writing {out}")
            save_safetensors_atomic(
                new.state_dict(), out, force=force, source=model if Path(model).exists() else None
            )
    if json_:
        emit_json({"out": str(out), "gauge": gauge, "drift": drift, "inputs": 16})
    else:
        stdout_console().print(
            f"wrote {out}; relative output drift on 16 sample inputs: {drift:.3e}"
        )
