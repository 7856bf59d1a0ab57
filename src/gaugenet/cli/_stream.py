"""`gaugenet equalize` and `gaugenet quantize` on a sharded safetensors folder: streamed
layer by layer (`gaugenet.stream`), the output a folder of the same layout."""

from __future__ import annotations

from pathlib import Path

from .._errors import GaugeError
from ._output import emit_json, handled, progress, stdout_console

__all__ = ["stream_command"]


def stream_command(
    kind: str,
    model: str,
    out: Path,
    *,
    bits: int = 4,
    granularity: str = "per-tensor",
    scheme: str | None = None,
    equalize: bool = False,
    arch: str | None = None,
    input_shape: str | None = None,
    force: bool = False,
    json_: bool = False,
) -> None:
    """Run `kind` ("equalize" or "quantize") on the sharded checkpoint `model`, write the
    folder `out`, print what was done."""
    from ..stream import stream_equalize, stream_quantize

    with handled():
        if arch is not None or input_shape is not None:
            raise GaugeError(
                "--arch and --input-shape are for single files; a sharded checkpoint has its "
                "config.json, and is checked layer by layer on random inputs"
            )
        with progress() as bar:
            bar.add_task(f"streaming {model} ({kind}) into {out}", total=None)
            if kind == "equalize":
                r = stream_equalize(model, out, bits=bits, granularity=granularity, force=force)
            else:
                r = stream_quantize(model, out, scheme=scheme, equalize=equalize, force=force)
    result = {
        "out": str(r.out),
        "shards": r.shards,
        "factors": r.factors,
        "applied": r.applied,
        "skipped": [{"factors": n, "why": w} for n, w in r.skipped],
        "local_change": r.local_change,
        "objective": "weight quantization error of the tensors each factor touches",
        "error_before": r.error_before,
        "error_after": r.error_after,
        "rounded": r.rounded,
        "seconds": r.seconds,
    }
    if json_:
        emit_json(result)
        return
    con = stdout_console()
    con.print(f"wrote {r.out} ({r.shards} shards, streamed; {r.seconds:.1f} s)")
    if kind == "equalize" or equalize:
        con.print(
            f"{r.applied} of {r.factors} factors moved, each checked on its own module in "
            f"float64 (largest relative output change {r.local_change:.1e}); local objective "
            f"(weight quantization error of the touched weights) {r.error_before:.4g} -> "
            f"{r.error_after:.4g}"
        )
        for names, why in r.skipped:
            con.print(f"left as it was: {names}: {why}")
    if kind == "quantize":
        con.print(f"rounded {r.rounded} Linear weights ({scheme})")
