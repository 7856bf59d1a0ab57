"""The typer application; each command lives in its own module and registers here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gaugenet",
    help=(
        "Gauge symmetries of neural networks: find, verify, fix and use them. Results go to "
        "stdout (--json for scripts), progress and errors to stderr; exit code 2 means a "
        "refusal (bad input, a failed check, an output that may not be written)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"gaugenet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Gauge symmetries of neural networks: find, verify, fix and use them."""


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    from . import (
        _canonicalize,  # noqa: F401
        _equalize,  # noqa: F401
        _inspect,  # noqa: F401
        _quantize,  # noqa: F401
        _reproduce,  # noqa: F401
        _zoo,  # noqa: F401
    )


def main() -> None:
    _register()
    app()
