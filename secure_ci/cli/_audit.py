"""`secure-ci audit ...`: Audit tasks recorded on the ledger."""

from __future__ import annotations

import typer

app = typer.Typer(help="Audit tasks recorded on the ledger.", no_args_is_help=True)
