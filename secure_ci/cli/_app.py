"""The root typer application; command groups attach themselves in ``secure_ci.cli``."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="secure-ci",
    help="Confidential, ledger-backed collaborative inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from secure_ci import __version__

        typer.echo(f"secure-ci {__version__}")
        raise typer.Exit


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Confidential, ledger-backed collaborative inference."""
