"""TLS 1.3 contexts and the verify-before-send connect, on real loopback TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secure_ci.channel import client_context, open_verified_connection, server_context
from secure_ci.exceptions import ChannelError, MeasurementError


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")])
    now = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def _counting_server() -> tuple[asyncio.Server, list[bytes], asyncio.Event]:
    cert_pem, key_pem = _self_signed()
    received: list[bytes] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                received.append(await reader.read())
        except (OSError, ssl.SSLError, TimeoutError):
            received.append(b"")
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_context(cert_pem, key_pem)
    )
    return server, received, done


async def test_refused_certificate_sends_zero_application_bytes() -> None:
    server, received, done = await _counting_server()
    port = server.sockets[0].getsockname()[1]
    seen: list[bytes] = []

    def refuse(cert_der: bytes) -> None:
        seen.append(cert_der)
        raise MeasurementError("plain certificate without evidence")

    async with server:
        with pytest.raises(MeasurementError):
            await open_verified_connection("127.0.0.1", port, verify=refuse, connect_timeout=5)
        async with asyncio.timeout(5):
            await done.wait()
    assert received == [b""]
    assert seen
    assert x509.load_der_x509_certificate(seen[0]).subject.rfc4514_string() == "CN=plain"


async def test_accepted_certificate_carries_data_over_tls13() -> None:
    server, received, done = await _counting_server()
    port = server.sockets[0].getsockname()[1]
    async with server:
        conn = await open_verified_connection(
            "127.0.0.1", port, verify=lambda der: len(der), connect_timeout=5
        )
        assert conn.peer == len(conn.server_cert_der)
        assert conn.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        conn.writer.write(b"hello")
        await conn.writer.drain()
        conn.writer.close()
        async with asyncio.timeout(5):
            await done.wait()
    assert received == [b"hello"]


async def test_connect_refused_is_channel_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ChannelError):
        await open_verified_connection("127.0.0.1", port, verify=len, connect_timeout=5)


def test_contexts_are_tls13_only() -> None:
    cert_pem, key_pem = _self_signed()
    for ctx in (client_context(), server_context(cert_pem, key_pem)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3


def test_server_context_rejects_mismatched_key() -> None:
    cert_pem, _ = _self_signed()
    _, other_key = _self_signed()
    with pytest.raises(ChannelError):
        server_context(cert_pem, other_key)
