"""The deployment file: which chain and contract every party of one deployment talks to.

``secure-ci ledger deploy`` writes it; every other command takes it (``--deployment FILE``).
It is public (no secrets) and small::

    {"format": "secure-ci/deployment/v1", "chain_id": 31337,
     "contract": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
     "deployment_block": 1, "rpc": "http://127.0.0.1:8545"}

The chain id and contract fix the EIP-712 domain every record is signed under; the deployment
block is where registry and batch reads start. Parsing is strict: exact keys, bounded size.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

from eth_utils.address import to_checksum_address

from secure_ci.exceptions import ConfigError
from secure_ci.ledger._records import LedgerDomain

__all__ = ["DEPLOYMENT_FORMAT", "Deployment"]

DEPLOYMENT_FORMAT = "secure-ci/deployment/v1"
MAX_DEPLOYMENT_BYTES = 4096
_KEYS = {"format", "chain_id", "contract", "deployment_block", "rpc"}


def _checksummed(raw: bytes) -> str:
    return str(to_checksum_address(raw))


def check_rpc_url(rpc: object, what: str = "rpc") -> str:
    """An http(s) URL with a host, or ConfigError."""
    try:
        url = urllib.parse.urlsplit(rpc) if isinstance(rpc, str) and len(rpc) <= 2048 else None
        host = url.hostname if url is not None else None
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        url = host = None
    if url is None or url.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{what} must be an http(s) URL, not {rpc!r}")
    return str(rpc)


@dataclass(frozen=True)
class Deployment:
    """One SecureCILedger on one chain."""

    chain_id: int
    contract: bytes
    deployment_block: int
    rpc: str

    def __post_init__(self) -> None:
        for name, value, high in (
            ("chain_id", self.chain_id, 2**63),
            ("deployment_block", self.deployment_block, 2**63),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise ConfigError(f"deployment {name} must be a whole number in 0..{high}")
        if self.chain_id == 0:
            raise ConfigError("deployment chain_id must not be 0")
        if not isinstance(self.contract, bytes) or len(self.contract) != 20:
            raise ConfigError("deployment contract must be a 20-byte address")
        if self.contract == bytes(20):
            raise ConfigError("deployment contract must not be the zero address")
        check_rpc_url(self.rpc, "deployment rpc")

    @property
    def contract_text(self) -> str:
        return _checksummed(self.contract)

    @property
    def domain(self) -> LedgerDomain:
        """The EIP-712 domain of every record of this deployment."""
        return LedgerDomain(self.chain_id, self.contract)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": DEPLOYMENT_FORMAT,
                "chain_id": self.chain_id,
                "contract": self.contract_text,
                "deployment_block": self.deployment_block,
                "rpc": self.rpc,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Deployment:
        """Parse a deployment file (ConfigError for anything malformed)."""
        if len(data) > MAX_DEPLOYMENT_BYTES:
            raise ConfigError(f"a deployment file is at most {MAX_DEPLOYMENT_BYTES} bytes")
        try:
            doc: Any = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"the deployment file is not JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) != _KEYS:
            raise ConfigError(f"a deployment file has exactly the keys {sorted(_KEYS)}")
        if doc["format"] != DEPLOYMENT_FORMAT:
            raise ConfigError(f"unknown deployment format {doc['format']!r}")
        contract = doc["contract"]
        if not isinstance(contract, str) or len(contract) != 42 or not contract.startswith("0x"):
            raise ConfigError("deployment contract must be a 0x address")
        try:
            raw = bytes.fromhex(contract[2:])
        except ValueError:
            raise ConfigError("deployment contract must be a 0x address") from None
        body = contract[2:]
        if body != body.lower() and body != body.upper() and _checksummed(raw) != contract:
            raise ConfigError(f"deployment contract {contract} has a bad EIP-55 checksum")
        return cls(doc["chain_id"], raw, doc["deployment_block"], doc["rpc"])
