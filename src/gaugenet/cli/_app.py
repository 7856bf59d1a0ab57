"""The typer application; each command lives in its own module and registers here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gaugenet",
    help="Gauge symmetries of neural networks: find, verify, fix and use them.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Gauge symmetries of neural networks: find, verify, fix and use them."""


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    from . import (
        _canonicalize,  # noqa: F401
        _equalize,  # noqa: F401
        _inspect,  # noqa: F401
        _reproduce,  # noqa: F401
        _zoo,  # noqa: F401
    )


def main() -> None:
    _register()
    app()
