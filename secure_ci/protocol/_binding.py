"""The channel binding a device signs to tie its identity key to one attested session."""

from __future__ import annotations

from secure_ci._encoding import digest

__all__ = ["channel_binding"]


def channel_binding(
    *, quote_id: bytes, server_nonce: bytes, session_id: bytes, device: str
) -> bytes:
    """Digest over the RA-TLS quote id, the edge's nonce, the session id and the device
    address (exactly as sent in ``Hello``): a signature over it cannot be replayed on
    another session or towards another enclave."""
    return digest("channel-binding/v1", [quote_id, server_nonce, session_id, device])
