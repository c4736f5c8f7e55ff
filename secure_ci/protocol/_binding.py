"""Bindings between keys: the device's identity key to one attested session, and the
enclave's result-signing key to the enclave's quote."""

from __future__ import annotations

from secure_ci._encoding import digest

__all__ = ["channel_binding", "enclave_key_binding"]


def channel_binding(
    *, quote_id: bytes, server_nonce: bytes, session_id: bytes, device: str
) -> bytes:
    """Digest over the RA-TLS quote id, the edge's nonce, the session id and the device
    address (exactly as sent in ``Hello``): a signature over it cannot be replayed on
    another session or towards another enclave."""
    return digest("channel-binding/v1", [quote_id, server_nonce, session_id, device])


def enclave_key_binding(address: bytes) -> bytes:
    """What the RA-TLS certificate's quote binds in ``report_data[32:64]`` (as its SHA-256):
    the 20-byte address of the enclave's result-signing key.

    The quote itself then attests that key: a device checks it against the address announced
    in ``HelloAck``, and anyone holding the quote (whose ``quote_id`` the ledger registry
    records) can check that the registered edge key lives in the measured enclave.
    """
    if len(address) != 20:
        raise ValueError("an enclave key address is 20 bytes")
    return b"secure-ci/enclave-key/v1" + address
