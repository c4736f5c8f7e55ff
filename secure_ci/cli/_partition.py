"""`secure-ci partition ...`: cut points, boundary sizes, latency profiles."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Analyse and split models: cut points, boundary sizes, latency profiles.",
    no_args_is_help=True,
)
