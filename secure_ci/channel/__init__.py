"""The attested channel: TLS 1.3 with RA-TLS verification before any byte, and framing."""

from __future__ import annotations

from secure_ci.channel._attested import AttestedChannel, connect_attested
from secure_ci.channel._stream import FramedStream
from secure_ci.channel._tls import (
    VerifiedConnection,
    client_context,
    open_verified_connection,
    server_context,
)

__all__ = [
    "AttestedChannel",
    "FramedStream",
    "VerifiedConnection",
    "client_context",
    "connect_attested",
    "open_verified_connection",
    "server_context",
]
