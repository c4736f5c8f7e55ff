"""TLS 1.3 contexts and the attested connect.

The server presents an RA-TLS certificate: a self-signed certificate whose extension carries
the enclave's quote, binding the TLS key. No CA can vouch for that, so the client context does
not verify certificates by name or chain (``CERT_NONE``, no hostname check); instead
:func:`open_verified_connection` takes the peer certificate right after the handshake and runs
the caller's verifier on it *before a single application byte is written*. A failed
verification closes the connection with nothing sent.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from secure_ci.exceptions import ChannelError, DeadlineExceeded

__all__ = [
    "VerifiedConnection",
    "client_context",
    "open_verified_connection",
    "server_context",
]

T = TypeVar("T")


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.3-only server context presenting ``cert_pem`` with ``key_pem``.

    ``ssl`` only loads keys from files, so the pair goes through a private temporary directory
    (mode 0700, inside the enclave's tmpfs under Gramine) that is removed immediately.
    """
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_NONE  # devices authenticate inside the channel, by signature
    with tempfile.TemporaryDirectory(prefix="secure-ci-tls-") as tmp:
        os.chmod(tmp, 0o700)
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise ChannelError(f"cannot load the TLS certificate and key: {exc}") from exc
    return ctx


def client_context() -> ssl.SSLContext:
    """A TLS 1.3-only client context; the peer certificate is verified explicitly afterwards."""
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # RA-TLS: verified by the attestation verifier instead
    return ctx


@dataclass(frozen=True)
class VerifiedConnection(Generic[T]):
    """A TLS 1.3 connection whose server certificate passed the verifier (``peer``)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: T
    server_cert_der: bytes


async def _close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except (OSError, ssl.SSLError, TimeoutError):
        pass


async def open_verified_connection(
    host: str,
    port: int,
    *,
    verify: Callable[[bytes], T],
    connect_timeout: float,
    context: ssl.SSLContext | None = None,
    limit: int = 1 << 16,
) -> VerifiedConnection[T]:
    """Connect with TLS 1.3, run ``verify(server_cert_der)``, and only then hand back streams.

    ``verify`` raises (an :class:`AttestationError` for RA-TLS) to refuse; the connection is
    then closed without any application data having been written.
    """
    ctx = context if context is not None else client_context()
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ctx, server_hostname=None, limit=limit
            )
    except TimeoutError as exc:
        raise DeadlineExceeded(f"TLS connect to {host}:{port} timed out") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ChannelError(f"TLS connect to {host}:{port} failed: {exc}") from exc
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject) or ssl_object.version() != "TLSv1.3":
            raise ChannelError("the connection is not TLS 1.3")
        cert_der = ssl_object.getpeercert(binary_form=True)
        if not cert_der:
            raise ChannelError("the server presented no certificate")
        peer = verify(cert_der)
    except BaseException:
        await _close_quietly(writer)
        raise
    return VerifiedConnection(reader, writer, peer, cert_der)
