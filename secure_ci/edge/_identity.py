"""The enclave's identity: its TLS credentials (RA-TLS) and its secp256k1 signing key.

Both keys are generated inside the enclave at start and never leave it. The RA-TLS quote binds
the TLS key; results are signed with the signing key, whose address the edge announces over
that attested channel, so a device can attribute every signed result to the measured enclave.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import coincurve
from cryptography.hazmat.primitives.asymmetric import ec

from secure_ci.attestation import (
    EvidenceProvider,
    RatlsCredentials,
    SgxReportBody,
    make_ratls_certificate,
    parse_quote,
    spki_der_of,
)
from secure_ci.edge._config import format_address
from secure_ci.edge._state import SealedKeys, SealedStore
from secure_ci.ledger._journal import JournalEntry
from secure_ci.ledger._records import address_of
from secure_ci.protocol._binding import enclave_key_binding

__all__ = [
    "EnclaveIdentity",
    "MemoryJournal",
    "RecordSink",
    "create_identity",
    "measurement_of",
    "recover_identity",
]


@dataclass(frozen=True)
class EnclaveIdentity:
    """What the edge is: TLS credentials, signing key and the measurement/quote the ledger sees."""

    credentials: RatlsCredentials = field(repr=False)
    signing_key: bytes = field(repr=False)
    address: bytes
    measurement: bytes
    quote_id: bytes
    spki_der: bytes = field(repr=False)

    @property
    def address_text(self) -> str:
        """The signing address as EIP-55 ``0x`` text."""
        return format_address(self.address)


def new_signing_key(random_bytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh secp256k1 private key."""
    while True:
        key = random_bytes(32)
        try:
            coincurve.PrivateKey(key)
            return key
        except ValueError:  # zero or >= n: astronomically rare, draw again
            continue


def create_identity(
    provider: EvidenceProvider,
    *,
    now: int,
    random_bytes: Callable[[int], bytes] = os.urandom,
    keys: SealedKeys | None = None,
) -> EnclaveIdentity:
    """An RA-TLS certificate from ``provider``'s evidence around ``keys`` (new keys if None)."""
    key = keys.signing_key if keys is not None else new_signing_key(random_bytes)
    address = address_of(key)
    # The certificate's quote binds the TLS key (report_data[0:32]) and this signing key's
    # address (report_data[32:64]), so results are attributable from the quote alone.
    credentials = make_ratls_certificate(
        provider,
        now=now,
        key=keys.tls_key if keys is not None else None,
        nonce=enclave_key_binding(address),
    )
    quote = parse_quote(credentials.quote)
    body = quote.body
    measurement = (
        body.mrenclave if isinstance(body, SgxReportBody) else hashlib.sha256(body.mrtd).digest()
    )
    return EnclaveIdentity(
        credentials=credentials,
        signing_key=key,
        address=address,
        measurement=measurement,
        quote_id=bytes.fromhex(quote.quote_id),
        spki_der=spki_der_of(credentials.key),
    )


def measurement_of(provider: EvidenceProvider) -> bytes:
    """The measurement the ledger knows the enclave by (MRENCLAVE; SHA-256 of MRTD for TDX)."""
    body = parse_quote(provider.quote(bytes(64))).body
    return body.mrenclave if isinstance(body, SgxReportBody) else hashlib.sha256(body.mrtd).digest()


def recover_identity(
    provider: EvidenceProvider, store: SealedStore, *, now: int
) -> tuple[EnclaveIdentity, bool]:
    """The identity sealed in ``store`` (True), or a new one, sealed there first (False)."""
    keys = SealedKeys.load(store)
    recovered = keys is not None
    if keys is None:
        tls_key = ec.generate_private_key(ec.SECP256R1())
        keys = SealedKeys(new_signing_key(), tls_key)
        keys.save(store)  # sealed before it signs anything
    return create_identity(provider, now=now, keys=keys), recovered


class RecordSink(Protocol):
    """Where the edge appends its records: the ledger's ``Journal`` or :class:`MemoryJournal`.

    ``append_many`` must be durable when it returns (results are sent only after it) and
    takes records whose ``edge_seq`` continue ``next_seq``.
    """

    @property
    def next_seq(self) -> int: ...

    def append_many(self, entries: Sequence[JournalEntry]) -> None: ...


class MemoryJournal:
    """An in-memory, bounded stand-in for the write-ahead journal (tests and benchmarks)."""

    def __init__(self, max_entries: int = 1 << 16) -> None:
        self.entries: list[JournalEntry] = []
        self.dropped = 0
        self._max = max_entries
        self._next_seq = 0

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def append_many(self, entries: Sequence[JournalEntry]) -> None:
        self.entries.extend(entries)
        self._next_seq += len(entries)
        overflow = len(self.entries) - self._max
        if overflow > 0:
            del self.entries[:overflow]
            self.dropped += overflow
