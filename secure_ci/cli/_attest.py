"""`secure-ci attest ...`: verify and simulate enclave evidence."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Verify and simulate enclave evidence (SGX/TDX quotes, RA-TLS certificates).",
    no_args_is_help=True,
)
