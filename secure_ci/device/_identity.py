"""The device's identity: the secp256k1 key that authenticates it and signs its records."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from eth_utils.address import to_checksum_address

from secure_ci.exceptions import ConfigError, SignatureError
from secure_ci.ledger._records import address_of, sign_digest

__all__ = ["DeviceIdentity"]


@dataclass(frozen=True)
class DeviceIdentity:
    """A device key and its Ethereum address (the identity the edge and the ledger know)."""

    key: bytes = field(repr=False)
    address: bytes = field(init=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "address", address_of(self.key))
        except SignatureError as exc:
            raise ConfigError(f"invalid device key: {exc}") from None

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = os.urandom) -> DeviceIdentity:
        """A new random identity (a draw outside the curve order is retried, bounded)."""
        for _ in range(8):
            try:
                return cls(random_bytes(32))
            except ConfigError:
                continue
        raise ConfigError("random_bytes did not yield a valid secp256k1 key")

    @classmethod
    def from_hex(cls, text: str) -> DeviceIdentity:
        """Parse a 32-byte private key written as (optionally 0x-prefixed) hex."""
        try:
            key = bytes.fromhex(text.strip().removeprefix("0x"))
        except ValueError:
            raise ConfigError("a device key must be 64 hex digits") from None
        if len(key) != 32:
            raise ConfigError("a device key must be 32 bytes")
        return cls(key)

    @property
    def address_text(self) -> str:
        """EIP-55 ``0x`` form of the address, as sent in ``Hello``."""
        return str(to_checksum_address(self.address))

    def sign(self, digest: bytes) -> bytes:
        """65-byte ``r || s || v`` signature over a 32-byte digest."""
        return sign_digest(self.key, digest)
