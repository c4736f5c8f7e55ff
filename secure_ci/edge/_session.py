"""One device session on the edge: handshake, authentication, then pipelined requests.

Every request is checked (see ``EdgeService.run_request``): the model and cut, the deadline,
the features against the registered boundary specs before they reach torch, replay across
sessions, and the device's signature over its ``TaskRequest`` record, which is checked beside
the tail and before anything is signed, journaled or answered. Failures of one task answer
with a per-task ``Error`` frame; protocol faults end the session with a fatal ``Error`` frame.
Nothing a device sends can crash the edge or hold resources beyond the configured limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from secure_ci.attestation import fresh_evidence
from secure_ci.channel import FramedStream
from secure_ci.edge._config import format_address, parse_address
from secure_ci.exceptions import (
    ChannelError,
    ConfigError,
    ProtocolError,
    SecureCIError,
    SignatureError,
)
from secure_ci.ledger._records import recover_signer
from secure_ci.protocol import (
    PROTOCOL_VERSIONS,
    Authenticate,
    AuthOk,
    Challenge,
    Close,
    Connection,
    Error,
    ErrorCode,
    Event,
    Evidence,
    Hello,
    HelloAck,
    InferRequest,
    Ping,
    Pong,
    Role,
    channel_binding,
    wanted_models,
)

if TYPE_CHECKING:
    from secure_ci.edge._service import EdgeService

__all__ = ["serve_session"]

log = logging.getLogger(__name__)


async def _expect_handshake(stream: FramedStream, edge: EdgeService) -> bytes:
    hello = await stream.next_event()
    if not isinstance(hello, Hello):
        raise ProtocolError("expected Hello", code=ErrorCode.UNEXPECTED)
    common = set(hello.versions) & set(PROTOCOL_VERSIONS)
    if not common:
        raise ProtocolError("no common protocol version", code=ErrorCode.UNSUPPORTED_VERSION)
    try:
        device = parse_address(hello.device)
    except ConfigError as exc:
        raise ProtocolError(str(exc), code=ErrorCode.MALFORMED) from None
    session_id, nonce = edge.random_bytes(16), edge.random_bytes(32)
    limits = edge.config.limits
    await stream.send(
        HelloAck(
            version=max(common),
            session_id=session_id,
            server_nonce=nonce,
            enclave=format_address(edge.identity.address),
            limits={
                "max_in_flight": limits.max_inflight_per_device,
                "max_frame_bytes": limits.max_frame_bytes,
            },
        )
    )
    auth = await stream.next_event()
    if not isinstance(auth, Authenticate):
        raise ProtocolError("expected Authenticate", code=ErrorCode.UNEXPECTED)
    binding = channel_binding(
        quote_id=edge.identity.quote_id,
        server_nonce=nonce,
        session_id=session_id,
        device=hello.device,
    )
    try:
        signer = recover_signer(auth.signature, binding)
    except SignatureError:
        raise ProtocolError("bad authentication signature", code=ErrorCode.BAD_SIGNATURE) from None
    if signer != device:
        raise ProtocolError("authentication signed by another key", code=ErrorCode.BAD_SIGNATURE)
    if device not in edge.allowed_devices:
        log.info("session refused: device %s is not allowed (not registered?)", hello.device)
        raise ProtocolError("device is not allowed on this edge", code=ErrorCode.UNAUTHORIZED)
    for model_id, cut in wanted_models(hello.capabilities):
        edge.models.get(model_id, cut)  # UNKNOWN_MODEL before the device sends a feature byte
    await stream.send(AuthOk())
    log.info("session admitted: device %s", hello.device)
    return device


async def serve_session(
    edge: EdgeService,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Run one connection to its end; never raises (errors become error frames)."""
    stream = FramedStream(
        reader,
        writer,
        Connection(Role.EDGE, limits=edge.protocol_limits, now=monotonic()),
        clock=monotonic,
    )
    try:
        if not edge.admit_session():
            raise ProtocolError("too many sessions", code=ErrorCode.BUSY)
        try:
            device = await _expect_handshake(stream, edge)
            await _serve_requests(stream, edge, device, monotonic)
        finally:
            edge.release_session()
    except ProtocolError as exc:
        edge.stats["session_errors"] += 1
        log.info("session ended with %s (code %d)", exc.reason, exc.code)
        await stream.send_fatal(exc)
    except (ChannelError, ConnectionError):
        edge.stats["session_errors"] += 1
    except SecureCIError as exc:  # e.g. the provider failed to produce fresh evidence
        edge.stats["session_errors"] += 1
        log.warning("session failed: %s", exc)
        await stream.send_fatal(ProtocolError("internal error", code=ErrorCode.INTERNAL))
    except asyncio.CancelledError:  # shutdown: tell the device why, then finish cancelling
        await stream.send_fatal(
            ProtocolError("the edge is shutting down", code=ErrorCode.SHUTTING_DOWN)
        )
        raise
    finally:
        await stream.aclose()


async def _serve_requests(
    stream: FramedStream, edge: EdgeService, device: bytes, monotonic: Callable[[], float]
) -> None:
    answering: set[asyncio.Task[None]] = set()
    try:
        while True:
            event = await stream.next_event()
            if isinstance(event, InferRequest):
                task = asyncio.create_task(_answer(stream, edge, device, event, monotonic()))
                answering.add(task)
                task.add_done_callback(answering.discard)
            elif isinstance(event, Ping):
                await stream.send(Pong(nonce=event.nonce))
            elif isinstance(event, Challenge):
                quote = await asyncio.to_thread(
                    fresh_evidence, edge.provider, edge.identity.spki_der, event.nonce
                )
                await stream.send(Evidence(quote=quote))
            elif isinstance(event, Close):
                break
            elif isinstance(event, Error):
                log.info("device reported error %d: %s", event.code, event.reason)
                return
        if answering:  # the device closed: finish what is in flight, then close
            await asyncio.wait(set(answering))
        if not stream.connection.our_closed:
            await stream.send(Close())
    finally:
        for task in answering:
            task.cancel()
        if answering:
            await asyncio.wait(set(answering))


async def _send_answer(stream: FramedStream, edge: EdgeService, answer: Event) -> None:
    """Send within ``request_timeout``: a device that stops reading is cut off, so it cannot
    pin answers (and their memory) by leaving its receive window full."""
    try:
        async with asyncio.timeout(edge.config.limits.request_timeout):
            await stream.send(answer)
    except TimeoutError:
        stream.writer.transport.abort()
        raise ChannelError("the device stopped reading") from None


async def _answer(
    stream: FramedStream,
    edge: EdgeService,
    device: bytes,
    request: InferRequest,
    received_at: float,
) -> None:
    try:
        result = await edge.run_request(device, request, received_at)
        await _send_answer(stream, edge, result)
    except ProtocolError as exc:
        edge.stats["task_errors"] += 1
        with contextlib.suppress(SecureCIError, ConnectionError):
            await _send_answer(stream, edge, Error.from_exception(exc, task_id=request.task_id))
    except (SecureCIError, ConnectionError):
        pass  # the connection is gone; the record (if any) is in the journal
    except Exception:  # a bug must not go unnoticed, nor take the session down silently
        log.exception("internal error answering a task")
        with contextlib.suppress(SecureCIError, ConnectionError):
            error = Error(code=ErrorCode.INTERNAL, reason="internal error", task_id=request.task_id)
            await _send_answer(stream, edge, error)
