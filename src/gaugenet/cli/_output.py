"""Where commands write: results to stdout (plain and untruncated when piped, or JSON),
progress and errors to stderr, and the exit codes of refusals.

Exit codes: 0 success, 1 a measured check failed (`reproduce`) or an unexpected error,
2 a refusal (`GaugeError`: bad input, a check that did not hold, an output that may not
be written), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import click
import torch
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .._errors import GaugeError

__all__ = ["emit_json", "handled", "jsonable", "progress", "stdout_console"]


def stdout_console() -> Console:
    """The console for results (no markup: names are printed as they are): on a terminal as
    usual; piped, as wide as the content, so that tables never truncate names."""
    if sys.stdout.isatty():
        return Console(markup=False)
    return Console(width=100_000, markup=False, no_color=True, highlight=False, soft_wrap=True)


def progress() -> Progress:
    """A transient spinner on stderr with the current step and the elapsed time."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code=code)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Turn errors into one line on stderr and an exit code: `GaugeError` (and memory
    exhaustion) 2, an interrupt 130, anything else 1 (its traceback with
    `GAUGENET_DEBUG=1`)."""
    try:
        yield
    except (click.exceptions.Exit, click.ClickException, click.Abort):
        raise
    except GaugeError as exc:
        raise _fail(str(exc), 2) from None
    except MemoryError:
        raise _fail("out of memory: use smaller inputs (--input-shape, --inputs)", 2) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    except Exception as exc:
        if os.environ.get("GAUGENET_DEBUG"):
            raise
        raise _fail(
            f"unexpected {type(exc).__name__}: {exc} (rerun with GAUGENET_DEBUG=1 for the "
            "traceback, and please report it)",
            1,
        ) from None


def jsonable(obj: Any) -> Any:
    """`obj` with dataclasses, tensors, tuples and non-finite floats made JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def emit_json(result: dict[str, Any]) -> None:
    """Print `result` as one JSON document on stdout."""
    typer.echo(json.dumps(jsonable(result), indent=2))
