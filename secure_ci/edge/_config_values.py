"""Value parsers shared by the edge configuration's tables (ConfigError for bad values)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_ci.exceptions import ConfigError
from secure_ci.ledger._records import keccak256

__all__ = [
    "bounded",
    "format_address",
    "hex32",
    "int_list",
    "parse_address",
    "path_of",
    "str_list",
    "table_of",
]

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def format_address(raw: bytes) -> str:
    """EIP-55 checksummed ``0x`` text of a 20-byte address."""
    body = raw.hex()
    hashed = keccak256(body.encode()).hex()
    return "0x" + "".join(
        c.upper() if c.isalpha() and int(h, 16) >= 8 else c
        for c, h in zip(body, hashed, strict=False)
    )


def parse_address(text: object) -> bytes:
    """A 20-byte address from ``0x`` hex; mixed case must be a valid EIP-55 checksum."""
    if not isinstance(text, str) or not _ADDRESS.fullmatch(text):
        raise ConfigError(f"not an address: {text!r}")
    body = text[2:]
    raw = bytes.fromhex(body)
    if body != body.lower() and body != body.upper() and format_address(raw) != text:
        raise ConfigError(f"address {text} has a bad EIP-55 checksum")
    return raw


def bounded(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number in {low}..{high}, not {value!r}")


def table_of(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{key}] must be a table")
    return value


def hex32(value: object, name: str) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ConfigError(f"{name} must be 64 hex digits")
    return bytes.fromhex(value)


def int_list(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"{name} must be a list of integers")
    return tuple(value)


def str_list(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of strings")
    return tuple(value)


def path_of(value: object, base_dir: Path, name: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a path string")
    return (base_dir / value).resolve()
