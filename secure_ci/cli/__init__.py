"""The ``secure-ci`` command. The only part of secure-ci that reads files and the environment
and installs logging handlers; everything below it takes values as parameters."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.text import Text

from secure_ci.cli import (
    _attest,
    _audit,
    _bench,
    _demo,
    _device,
    _edge,
    _ledger,
    _model,
    _onboard,
    _partition,
)
from secure_ci.cli._app import app
from secure_ci.exceptions import ConfigError, ContractRevertError, SecureCIError

__all__ = ["app", "main"]

app.add_typer(_partition.app, name="partition")
app.add_typer(_attest.app, name="attest")
app.add_typer(_edge.app, name="edge")
app.add_typer(_device.app, name="device")
app.add_typer(_ledger.app, name="ledger")
app.add_typer(_audit.app, name="audit")
app.add_typer(_model.app, name="model")
_ = (_bench, _demo, _onboard)  # register their commands on import


def _say_error(message: str) -> None:
    """One line on stderr, printed literally (no markup, no wrapping)."""
    if sys.stderr.isatty():
        console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
        console.print(Text("error: ", style="red") + Text(message))
    else:
        sys.stderr.write(f"error: {message}\n")


def _leaf(exc: BaseException) -> BaseException:
    """The first error inside (nested) exception groups: task groups wrap what they raise."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def exit_code(exc: BaseException) -> int:
    """The exit code for ``exc``, after saying what went wrong in one line; re-raises bugs."""
    leaf = _leaf(exc)
    if isinstance(leaf, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return 130
    if isinstance(leaf, ConfigError):
        _say_error(str(leaf))
        return 2
    if isinstance(leaf, ContractRevertError):
        from secure_ci.ledger._hints import explain

        _say_error(explain(leaf))
        return 1
    if isinstance(leaf, SecureCIError):
        _say_error(str(leaf))
        return 1
    raise exc


def main() -> None:
    """Entry point: run the app, turning errors into one clear line and an exit code.

    Exit codes: 0 success, 1 the operation failed or was rejected, 2 usage or configuration,
    130 interrupted (Ctrl-C; typer maps a KeyboardInterrupt to it). Errors raised inside task
    groups are unwrapped first.
    """
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        app(standalone_mode=True)
    except (SecureCIError, BaseExceptionGroup, KeyboardInterrupt) as exc:
        sys.exit(exit_code(exc))
