"""Small pieces every command shares: bounded file reads, log levels, deployment options."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from secure_ci.exceptions import ConfigError

if TYPE_CHECKING:
    from secure_ci.ledger._deployment import Deployment

__all__ = [
    "DeploymentOption",
    "LogLevel",
    "load_deployment",
    "read_file",
    "set_log_level",
]

LogLevel = Annotated[
    Literal["debug", "info", "warning", "error"],
    typer.Option("--log-level", help="Log level (logs go to stderr)."),
]
DeploymentOption = Annotated[
    Path | None,
    typer.Option("--deployment", help="Deployment file written by `secure-ci ledger deploy`."),
]


def read_file(path: Path, what: str, limit: int) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them (ConfigError otherwise)."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes")
    return data


def set_log_level(level: str) -> None:
    """Log secure-ci's events at ``level`` from here on (other libraries stay at WARNING)."""
    logging.getLogger("secure_ci").setLevel(level.upper())


def load_deployment(
    deployment: Path | None, rpc: str | None = None, contract: str | None = None
) -> Deployment | tuple[str, str]:
    """The deployment file, or ``(rpc, contract)`` given instead (a usage error without either).

    An ``rpc`` given with a deployment file overrides the file's RPC URL.
    """
    import dataclasses

    from secure_ci.ledger._deployment import Deployment

    if deployment is not None:
        if contract is not None:
            raise ConfigError("give --deployment or --contract, not both")
        found = Deployment.from_json(read_file(deployment, "deployment", 4096))
        return dataclasses.replace(found, rpc=rpc) if rpc else found
    if rpc is None or contract is None:
        raise ConfigError(
            "say which ledger: --deployment FILE (from `secure-ci ledger deploy`), "
            "or --rpc URL and --contract ADDRESS"
        )
    return rpc, contract
