"""The device side of the attested channel refuses bad enclaves before sending a byte."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secure_ci.attestation import (
    RatlsCredentials,
    SimulatedProvider,
    make_ratls_certificate,
)
from secure_ci.channel import connect_attested, server_context
from secure_ci.exceptions import (
    AttestationError,
    CollateralError,
    DebugEnclaveError,
    EvidenceFormatError,
    MeasurementError,
    ReportDataError,
)
from secure_ci.testing import DEV_NOW, DevEnclave, dev_enclave, dev_provider

DAY = 86_400


@dataclass(frozen=True)
class _UnboundProvider:
    """Quotes that bind some other key: report data chosen at random."""

    inner: SimulatedProvider

    @property
    def attestation_type(self) -> str:
        return "simulated"

    def quote(self, report_data: bytes) -> bytes:
        return self.inner.quote(os.urandom(64))

    def collateral(self) -> object:
        return self.inner.collateral()


async def _serve_once(credentials_pem: tuple[str, str]) -> tuple[asyncio.Server, list[bytes]]:
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                received.append(await reader.read())
        except (OSError, ssl.SSLError, TimeoutError):
            received.append(b"")
        writer.close()

    ctx = server_context(credentials_pem[0].encode(), credentials_pem[1].encode())
    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx), received


async def _refused(
    credentials: RatlsCredentials | tuple[str, str], enclave: DevEnclave, *, now: int = DEV_NOW
) -> AttestationError:
    if isinstance(credentials, RatlsCredentials):
        credentials = (credentials.cert_pem, credentials.key_pem)
    server, received = await _serve_once(credentials)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(AttestationError) as info:
            await connect_attested(
                "127.0.0.1",
                port,
                policy=enclave.policy,
                collateral=enclave.collateral,
                now_fn=lambda: now,
            )
        async with asyncio.timeout(5):
            while not received:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    assert received == [b""], "the device sent application bytes to a refused enclave"
    return info.value


async def test_accepts_the_dev_enclave() -> None:
    enclave = dev_enclave(DEV_NOW)
    creds = make_ratls_certificate(enclave.provider, now=DEV_NOW)
    server, _ = await _serve_once((creds.cert_pem, creds.key_pem))
    async with server:
        channel = await connect_attested(
            "127.0.0.1",
            server.sockets[0].getsockname()[1],
            policy=enclave.policy,
            collateral=enclave.collateral,
            now_fn=lambda: DEV_NOW,
        )
        assert channel.peer.mrenclave == enclave.provider.mrenclave
        channel.writer.close()


async def test_refuses_plain_certificate_without_evidence() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")])
    start = dt.datetime.fromtimestamp(DEV_NOW - DAY, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=3))
        .sign(key, hashes.SHA256())
    )
    pem = (
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )
    error = await _refused(pem, dev_enclave(DEV_NOW))
    assert isinstance(error, EvidenceFormatError)


async def test_refuses_evidence_bound_to_another_key() -> None:
    enclave = dev_enclave(DEV_NOW)
    creds = make_ratls_certificate(_UnboundProvider(enclave.provider), now=DEV_NOW)  # type: ignore[arg-type]
    assert isinstance(await _refused(creds, enclave), ReportDataError)


async def test_refuses_measurement_not_allowed() -> None:
    enclave = dev_enclave(DEV_NOW)
    other = dev_provider(enclave.pki, mrenclave=b"\x77" * 32)
    creds = make_ratls_certificate(other, now=DEV_NOW)
    assert isinstance(await _refused(creds, enclave), MeasurementError)


async def test_refuses_debug_enclave() -> None:
    enclave = dev_enclave(DEV_NOW)
    creds = make_ratls_certificate(dev_provider(enclave.pki, debug=True), now=DEV_NOW)
    assert isinstance(await _refused(creds, enclave), DebugEnclaveError)


async def test_refuses_expired_collateral() -> None:
    enclave = dev_enclave(DEV_NOW)
    creds = make_ratls_certificate(enclave.provider, now=DEV_NOW, validity_days=365)
    assert isinstance(await _refused(creds, enclave, now=DEV_NOW + 60 * DAY), CollateralError)


async def test_refuses_certificate_without_nonce_when_policy_requires_one() -> None:
    enclave = dev_enclave(DEV_NOW, require_nonce=True)
    creds = make_ratls_certificate(enclave.provider, now=DEV_NOW)
    assert isinstance(await _refused(creds, enclave), ReportDataError)
