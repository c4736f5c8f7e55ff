"""Shared by the package tests: a trained digits package (built once) and resealing helpers."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from secure_ci.package._format import DIGEST_DOMAIN, MAGIC, decode_container, encode_container
from secure_ci.testing._digits import (
    DIGITS_CACHE,
    DIGITS_CALIBRATION,
    digits_package,
    trained_digits,
)

# Shared with tests/zoo/test_digits.py so the full training runs once per machine.
SHARED_CACHE = DIGITS_CACHE
CALIBRATION = DIGITS_CALIBRATION
trained = trained_digits


def sections(data: bytes) -> tuple[dict[str, Any], bytes]:
    container = decode_container(data)
    return container.manifest, container.weights


def exit_section(data: bytes) -> bytes:
    return decode_container(data).exits


def reseal(manifest: dict[str, Any], weights: bytes, exits: bytes | None = None) -> bytes:
    """A package with a valid digest around whatever manifest, weights and exit heads we give
    it (by default the digits package's exit heads when the manifest describes exit heads)."""
    if exits is None:
        exits = exit_section(digits_package()) if manifest.get("exits") is not None else b""
    return encode_container(manifest, weights, exits)


def with_weights(data: bytes, weights: bytes) -> bytes:
    """``data`` with other weight bytes, the manifest's weights digest updated to match."""
    manifest, _ = sections(data)
    manifest["weights"] = {
        **manifest["weights"],
        "sha256": hashlib.sha256(weights).hexdigest(),
        "bytes": len(weights),
    }
    return reseal(manifest, weights, exit_section(data))


def with_exits(data: bytes, exits: bytes) -> bytes:
    """``data`` with other exit head bytes, the manifest's exits digest updated to match."""
    manifest, weights = sections(data)
    manifest["exits"] = {
        **manifest["exits"],
        "sha256": hashlib.sha256(exits).hexdigest(),
        "bytes": len(exits),
    }
    return reseal(manifest, weights, exits)


def raw_container(
    manifest: bytes, weights: bytes, *, version: int = 2, flags: int = 0, exits: bytes = b""
) -> bytes:
    """Package bytes around a raw manifest (not necessarily JSON), with a valid digest; version
    1 has no exit heads section (and the v1 digest domain)."""
    body = (
        struct.pack("<6sBBI", MAGIC, version, flags, len(manifest))
        + manifest
        + struct.pack("<Q", len(weights))
        + weights
    )
    if version == 1:
        return body + hashlib.sha256(b"secure-ci/model-package/v1" + body).digest()
    body += struct.pack("<Q", len(exits)) + exits
    return body + hashlib.sha256(DIGEST_DOMAIN + body).digest()
