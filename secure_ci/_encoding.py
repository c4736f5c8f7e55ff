"""Canonical encodings and digests.

Anything that is hashed, signed or put on chain is encoded by exactly one function here, so
two parties that build the same value get the same bytes. Off-chain values use canonical CBOR
(RFC 8949 §4.2.1: shortest forms, sorted map keys, no indefinite lengths); digests are
domain-separated SHA-256 so a digest of one kind of thing can never be replayed as another.
On-chain encodings (ABI, EIP-712) live next to the contract bindings in ``secure_ci.ledger``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2

from secure_ci.exceptions import SecureCIError

__all__ = ["canonical_cbor", "decode_cbor", "digest", "sha256"]


def canonical_cbor(value: Any) -> bytes:
    """Encode ``value`` (maps, lists, str, bytes, int, bool, None, float) canonically."""
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise SecureCIError(f"value cannot be canonically encoded: {exc}") from exc


def decode_cbor(data: bytes, *, max_bytes: int = 1 << 20) -> Any:
    """Decode CBOR, refusing oversized input and trailing bytes; tags are not allowed."""
    if len(data) > max_bytes:
        raise SecureCIError(f"CBOR value of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        value = cbor2.loads(data, tag_hook=_refuse_tag)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise SecureCIError(f"malformed CBOR: {exc}") from exc
    if canonical_cbor(value) != data:
        raise SecureCIError("CBOR value is not in canonical form")
    return value


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    raise ValueError(f"CBOR tag {tag.tag} not allowed")


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def digest(domain: str, value: Any) -> bytes:
    """Domain-separated SHA-256 of the canonical CBOR encoding of ``value``."""
    tag = f"secure-ci/{domain}".encode()
    return hashlib.sha256(len(tag).to_bytes(1, "big") + tag + canonical_cbor(value)).digest()
