"""The ``secure-ci`` command. The only part of secure-ci that reads files and the environment
and installs logging handlers; everything below it takes values as parameters."""

from __future__ import annotations

import logging
import sys

from rich.console import Console

from secure_ci.cli import _attest, _audit, _bench, _demo, _device, _edge, _ledger, _partition
from secure_ci.cli._app import app
from secure_ci.exceptions import ConfigError, SecureCIError

__all__ = ["app", "main"]

app.add_typer(_partition.app, name="partition")
app.add_typer(_attest.app, name="attest")
app.add_typer(_edge.app, name="edge")
app.add_typer(_device.app, name="device")
app.add_typer(_ledger.app, name="ledger")
app.add_typer(_audit.app, name="audit")
_ = (_bench, _demo)  # register top-level commands on import


def main() -> None:
    """Entry point: run the app, turning library errors into one clear line and an exit code.

    Exit codes: 0 success, 1 the operation failed or was rejected, 2 usage or configuration.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=True)
    except ConfigError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except SecureCIError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(1)
