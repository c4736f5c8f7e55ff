"""Fixtures for the attestation tests: the real vectors in tests/vectors/attestation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from secure_ci.attestation import Collateral, DevPKI

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "attestation"
IN_WINDOW = 1750500000  # 2025-06-21, inside the sample collateral's validity window


def _load(name: str) -> bytes:
    data = (VECTORS / name).read_bytes()
    if name.endswith(".hex"):
        return bytes.fromhex(data.decode().strip().removeprefix("0x"))
    return data


@pytest.fixture(scope="session")
def vector() -> Callable[[str], bytes]:
    """Decoded quote bytes of a vector file (hex files are decoded)."""
    return _load


@pytest.fixture(scope="session")
def expected() -> dict[str, Any]:
    value: dict[str, Any] = json.loads((VECTORS / "EXPECTED.json").read_text())
    return value


@pytest.fixture(scope="session")
def in_window() -> int:
    return IN_WINDOW


@pytest.fixture(scope="session")
def sgx_collateral() -> Collateral:
    return Collateral.from_json((VECTORS / "sgx-v3-dcapqvl-sample.collateral.json").read_text())


@pytest.fixture(scope="session")
def tdx_collateral() -> Collateral:
    return Collateral.from_json((VECTORS / "tdx-v4-dcapqvl-sample.collateral.json").read_text())


@pytest.fixture(scope="session")
def dev_pki() -> DevPKI:
    """One development PKI for the session, valid at :data:`IN_WINDOW`."""
    return DevPKI.generate(IN_WINDOW, seed=7)
