"""`secure-ci device ...`: Device-side client commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="Device-side client commands.", no_args_is_help=True)
