"""``connect_attested``: TLS 1.3 to an edge whose RA-TLS certificate verifies under a policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from secure_ci.attestation import (
    Collateral,
    Policy,
    VerifiedEnclave,
    verify_ratls_certificate,
)
from secure_ci.channel._tls import VerifiedConnection, open_verified_connection

__all__ = ["AttestedChannel", "connect_attested"]

AttestedChannel: TypeAlias = VerifiedConnection[VerifiedEnclave]
"""Streams plus ``peer``: the :class:`VerifiedEnclave` behind the server certificate."""


async def connect_attested(
    host: str,
    port: int,
    *,
    policy: Policy,
    collateral: Collateral,
    now_fn: Callable[[], float],
    connect_timeout: float = 10.0,
) -> AttestedChannel:
    """Open TLS 1.3 and verify the RA-TLS certificate before any application byte is sent.

    Raises the :class:`AttestationError` subclass of the failed check (the connection is
    closed with nothing written), or :class:`ChannelError` when the transport fails.
    """

    def verify(cert_der: bytes) -> VerifiedEnclave:
        return verify_ratls_certificate(
            cert_der, collateral=collateral, policy=policy, now=int(now_fn())
        )

    return await open_verified_connection(
        host, port, verify=verify, connect_timeout=connect_timeout
    )
