"""`secure-ci ledger ...`: Run and manage the ledger chain and contract."""

from __future__ import annotations

import typer

app = typer.Typer(help="Run and manage the ledger chain and contract.", no_args_is_help=True)
