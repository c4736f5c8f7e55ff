"""The root typer application; command groups attach themselves in ``secure_ci.cli``."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="secure-ci",
    help="Confidential, ledger-backed collaborative inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
