"""`secure-ci edge ...`: Run the enclave-hosted edge service."""

from __future__ import annotations

import typer

app = typer.Typer(help="Run the enclave-hosted edge service.", no_args_is_help=True)
