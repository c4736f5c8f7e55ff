"""The device against a scripted (hostile or broken) edge speaking the protocol over real TLS.

Each scripted edge presents a genuine RA-TLS certificate from the dev enclave, then misbehaves
in one way: silence, results signed by another key, evidence for another nonce.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import torch

from secure_ci.attestation import make_ratls_certificate
from secure_ci.attestation._ratls import fresh_evidence, spki_der_of
from secure_ci.channel import FramedStream, server_context
from secure_ci.device import DeviceIdentity, open_session
from secure_ci.exceptions import (
    ChannelError,
    DeadlineExceeded,
    MeasurementError,
    ProtocolError,
    RemoteProtocolError,
    ReportDataError,
    SignatureError,
)
from secure_ci.ledger._records import address_of, sign_digest
from secure_ci.partition import PartitionPlan
from secure_ci.protocol import (
    PROTOCOL_VERSIONS,
    AuthOk,
    Challenge,
    Close,
    Connection,
    Error,
    ErrorCode,
    Event,
    Evidence,
    HelloAck,
    InferRequest,
    InferResult,
    Role,
    enclave_key_binding,
)
from secure_ci.testing import DEV_NOW, DevEnclave, dev_enclave

EDGE_KEY = b"\x42" * 32
OTHER_KEY = b"\x43" * 32
Script = Callable[[FramedStream, Event, DevEnclave, bytes], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_edge(
    script: Script, received: list[bytes], *, bound_key: bytes = EDGE_KEY
) -> AsyncIterator[tuple[int, DevEnclave]]:
    """A TLS server with the dev enclave's RA-TLS certificate running ``script`` per event.

    The certificate's quote binds ``bound_key``'s address; the edge announces ``EDGE_KEY``'s.
    """
    enclave = dev_enclave(DEV_NOW)
    binding = enclave_key_binding(address_of(bound_key))
    credentials = make_ratls_certificate(enclave.provider, now=DEV_NOW, nonce=binding)
    spki = spki_der_of(credentials.key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, Connection(Role.EDGE))
        original = reader.read

        async def recording_read(n: int = -1) -> bytes:
            data = await original(n)
            received.append(data)
            return data

        reader.read = recording_read  # type: ignore[method-assign]
        with contextlib.suppress(ProtocolError, ChannelError, OSError, ssl.SSLError):
            while not stream.connection.their_closed:
                await script(stream, await stream.next_event(), enclave, spki)
        await stream.aclose()

    server = await asyncio.start_server(
        handle,
        "127.0.0.1",
        0,
        ssl=server_context(credentials.cert_pem.encode(), credentials.key_pem.encode()),
    )
    async with server:
        yield server.sockets[0].getsockname()[1], enclave


def handshake_then(answer: Callable[[FramedStream, InferRequest], Awaitable[None]]) -> Script:
    async def script(stream: FramedStream, event: Event, enclave: DevEnclave, spki: bytes) -> None:
        name = type(event).__name__
        if name == "Hello":
            await stream.send(
                HelloAck(
                    version=PROTOCOL_VERSIONS[-1],
                    session_id=b"\x01" * 16,
                    server_nonce=b"\x02" * 32,
                    enclave="0x" + address_of(EDGE_KEY).hex(),
                )
            )
        elif name == "Authenticate":
            await stream.send(AuthOk())
        elif isinstance(event, Challenge):
            stale = b"\x00" * 32  # evidence bound to some other nonce
            await stream.send(Evidence(quote=fresh_evidence(enclave.provider, spki, stale)))
        elif isinstance(event, InferRequest):
            await answer(stream, event)
        elif isinstance(event, Close):
            await stream.send(Close())

    return script


def _plan() -> PartitionPlan:
    return PartitionPlan("ab" * 32, 0, "float32")


def _session(port: int, enclave: DevEnclave, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "policy": enclave.policy,
        "collateral": enclave.collateral,
        "identity": DeviceIdentity.generate(),
        "model": torch.nn.Identity(),
        "plan": _plan(),
        "clock": lambda: float(DEV_NOW),
        "timeout": 5.0,
    }
    options.update(overrides)
    return open_session(f"127.0.0.1:{port}", **options)


async def _ignore(stream: FramedStream, request: InferRequest) -> None:
    return None


async def _sign_with_other_key(stream: FramedStream, request: InferRequest) -> None:
    await stream.send(
        InferResult(
            task_id=request.task_id,
            status=0,
            payload=request.payload,
            salt=b"\x03" * 32,
            edge_seq=0,
            latency_ms=1,
            signature=sign_digest(OTHER_KEY, b"\x00" * 32),
        )
    )


async def _refuse(stream: FramedStream, request: InferRequest) -> None:
    await stream.send(Error(code=ErrorCode.BUSY, reason="full", task_id=request.task_id))


async def test_silent_edge_gives_deadline_exceeded() -> None:
    async with (
        scripted_edge(handshake_then(_ignore), []) as (port, enclave),
        _session(port, enclave, timeout=0.5) as session,
    ):
        with pytest.raises(DeadlineExceeded):
            await session.infer(torch.ones(1, 4))
        # the dropped request is kept, signed: the device can challenge the edge with it
        [(request, signature)] = session.unanswered
        assert request.edge == session.binding.address
        assert request.recover(signature, session.domain) == session.identity.address


async def test_a_silent_edge_never_blocks_the_device() -> None:
    """More requests than in-flight slots against an edge that never answers: each raises
    DeadlineExceeded (at once once the session failed), none waits for a slot forever."""
    async with (
        scripted_edge(handshake_then(_ignore), []) as (port, enclave),
        _session(port, enclave, timeout=0.3) as session,
    ):
        slots = session.max_in_flight
        calls = [asyncio.create_task(session.infer(torch.ones(1, 4))) for _ in range(slots + 8)]
        done, pending = await asyncio.wait(calls, timeout=30)
        assert not pending, "a request was still blocked 30 s after a 0.3 s deadline"
        for call in done:
            assert isinstance(call.exception(), DeadlineExceeded)
        for _ in range(3):  # and later calls fail fast, never hang
            with pytest.raises(DeadlineExceeded):
                await asyncio.wait_for(session.infer(torch.ones(1, 4)), 5)


async def test_announced_key_not_bound_by_the_quote_is_refused() -> None:
    received: list[bytes] = []
    with pytest.raises(ReportDataError, match="does not bind the result key"):
        async with (
            scripted_edge(handshake_then(_ignore), received, bound_key=b"\x43" * 32) as (
                port,
                enclave,
            ),
            _session(port, enclave),
        ):
            pass


async def test_result_signed_by_another_key_is_refused() -> None:
    async with (
        scripted_edge(handshake_then(_sign_with_other_key), []) as (port, enclave),
        _session(port, enclave) as session,
    ):
        with pytest.raises(SignatureError):
            await session.infer(torch.ones(1, 4))
        assert not session.receipts


async def test_error_frame_carries_its_code() -> None:
    async with (
        scripted_edge(handshake_then(_refuse), []) as (port, enclave),
        _session(port, enclave) as session,
    ):
        with pytest.raises(RemoteProtocolError) as info:
            await session.infer(torch.ones(1, 4))
        assert len(session.unanswered) == 1  # an unsigned refusal on the wire proves nothing
    assert info.value.code == ErrorCode.BUSY


async def test_stale_nonce_in_fresh_evidence_is_refused() -> None:
    async with scripted_edge(handshake_then(_ignore), []) as (port, enclave):
        policy = dataclasses.replace(enclave.policy, require_nonce=True)
        with pytest.raises(ReportDataError):
            async with _session(port, enclave, policy=policy):
                pass


async def test_refused_evidence_sends_nothing() -> None:
    received: list[bytes] = []
    async with scripted_edge(handshake_then(_ignore), received) as (port, enclave):
        policy = dataclasses.replace(enclave.policy, mrenclave=frozenset({b"\x09" * 32}))
        with pytest.raises(MeasurementError):
            async with _session(port, enclave, policy=policy):
                pass
        for _ in range(100):  # bounded wait for the server to see the end of stream
            if received:
                break
            await asyncio.sleep(0.01)
    assert b"".join(received) == b""


async def _garbage(stream: FramedStream, request: InferRequest) -> None:
    stream.writer.write(b"\x00\x00\x00\x05\x00\x01\xff\xff\xff")  # a frame with a bad header
    await stream.writer.drain()


async def test_malformed_answer_fails_the_session_with_malformed() -> None:
    async with (
        scripted_edge(handshake_then(_garbage), []) as (port, enclave),
        _session(port, enclave) as session,
    ):
        with pytest.raises(RemoteProtocolError) as info:
            await session.infer(torch.ones(1, 4))
        assert info.value.code == ErrorCode.MALFORMED
        with pytest.raises(RemoteProtocolError):  # the session stays failed
            await session.infer(torch.ones(1, 4))


async def _close_now(stream: FramedStream, request: InferRequest) -> None:
    await stream.send(Close())


async def test_edge_closing_fails_pending_and_later_requests() -> None:
    async with (
        scripted_edge(handshake_then(_close_now), []) as (port, enclave),
        _session(port, enclave) as session,
    ):
        with pytest.raises(ChannelError, match="closed"):
            await session.infer(torch.ones(1, 4))
        with pytest.raises(ChannelError):
            await session.infer(torch.ones(1, 4))
    with pytest.raises(ChannelError):
        await session.infer(torch.ones(1, 4))
