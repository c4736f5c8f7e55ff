"""Shared by the package tests: a trained digits package (built once) and resealing helpers."""

from __future__ import annotations

import functools
import hashlib
import struct
import tempfile
from pathlib import Path
from typing import Any

from secure_ci.package import pack_bytes
from secure_ci.package._format import DIGEST_DOMAIN, MAGIC, decode_container, encode_container
from secure_ci.zoo._digits import DIGITS_INPUT_SHAPE
from secure_ci.zoo._train import TrainedDigits, load_trained_digits

# Shared with tests/zoo/test_digits.py so the full training runs once per machine.
SHARED_CACHE = Path(tempfile.gettempdir()) / "secure-ci-test-cache"
CALIBRATION = 64


@functools.cache
def trained() -> TrainedDigits:
    return load_trained_digits(SHARED_CACHE)


@functools.cache
def digits_package() -> bytes:
    """The trained digits CNN, packed with the first 64 held-out samples as calibration."""
    model = trained()
    x, y = model.data.test_x[:CALIBRATION], model.data.test_y[:CALIBRATION]
    return pack_bytes(
        model.model,
        architecture="digits_cnn",
        input_shape=DIGITS_INPUT_SHAPE,
        calibration=(x, y),
        calibration_source="first 64 held-out digits",
        repeats=1,
    )


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
