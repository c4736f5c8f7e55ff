"""``open_session``: attested connect, device authentication, optional fresh evidence."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import torch
from torch import nn

from secure_ci.attestation import Collateral, Policy, extract_evidence, verify_quote
from secure_ci.channel import AttestedChannel, FramedStream, connect_attested
from secure_ci.device._identity import DeviceIdentity
from secure_ci.device._session import CLOSE_GRACE, DEFAULT_DOMAIN, Session, parse_edge_address
from secure_ci.device._tasks import EnclaveBinding
from secure_ci.exceptions import (
    AuthorizationError,
    ChannelError,
    DeadlineExceeded,
    PartitionError,
    RemoteProtocolError,
    ReportDataError,
)
from secure_ci.ledger._governance import RELEASE_MEASUREMENT
from secure_ci.ledger._records import LedgerDomain
from secure_ci.ledger._registry import RegisteredEdge
from secure_ci.ledger._releases import ReleaseCache
from secure_ci.partition import DEFAULT_CANONICAL, CanonicalRule, PartitionPlan
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
    Limits,
    Role,
    State,
    channel_binding,
    enclave_key_binding,
    model_capability,
)

__all__ = ["open_session"]

E = TypeVar("E", bound=Event)


@asynccontextmanager
async def open_session(
    address: str,
    *,
    policy: Policy,
    collateral: Collateral,
    identity: DeviceIdentity,
    model: nn.Module,
    plan: PartitionPlan,
    example_input: torch.Tensor | None = None,
    ledger_domain: LedgerDomain = DEFAULT_DOMAIN,
    timeout: float = 30.0,  # noqa: ASYNC109 - a per-request deadline, kept by the session
    limits: Limits | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    random_bytes: Callable[[int], bytes] = os.urandom,
    first_seq: int | None = None,
    registration: RegisteredEdge | None = None,
    releases: ReleaseCache | None = None,
    canonical: CanonicalRule = DEFAULT_CANONICAL,
) -> AsyncIterator[Session]:
    """Open an attested, authenticated session with the edge at ``HOST:PORT``.

    ``model`` is the full model, split at ``plan.cut`` after checking that its id is
    ``plan.model_id`` (pass ``example_input``), or, without ``example_input``, the head
    itself. ``clock`` gives Unix seconds (certificate and collateral validity, request
    deadlines); ``timeout`` bounds the handshake and each request. Request sequence numbers
    start at ``first_seq`` (default: the clock in microseconds, so they keep growing across
    sessions). Leaving the block closes the session after in-flight answers (bounded).

    ``registration`` is the edge as the ledger registry knows it: the session is refused
    (AuthorizationError, before a feature byte is sent) unless the edge is active, its
    measurement allowed, and its attested enclave key, measurement and quote id are the
    registered ones. The edge refuses at the handshake a model or cut it does not serve.

    ``releases`` is the device's cached view of the ledger's release registry: the session is
    refused (AuthorizationError, before a feature byte is sent) unless the attested
    measurement is a release valid on chain as of the view's last refresh.

    ``canonical`` is the model's canonical output rule (``ModelPackage.canonical``): each
    result's output commitment must open to it (the receipt keeps the opening for disputes).
    """
    host, port = parse_edge_address(address)
    view = await releases.view() if releases is not None else None
    head = await asyncio.to_thread(_prepare_head, model, plan, example_input)
    # A certificate's quote cannot carry our nonce: freshness is checked after AuthOk.
    cert_policy = dataclasses.replace(policy, require_nonce=False)
    channel = await connect_attested(
        host, port, policy=cert_policy, collateral=collateral, now_fn=clock,
        connect_timeout=timeout,
    )  # fmt: skip
    if limits is None:
        limits = Limits(idle_timeout=None)  # a quiet session is the device's choice
    connection = Connection(Role.DEVICE, limits=limits, now=monotonic())
    stream = FramedStream(channel.reader, channel.writer, connection, clock=monotonic)
    try:
        try:
            async with asyncio.timeout(timeout):
                binding = await _handshake(
                    stream, channel, identity, policy, collateral, clock, random_bytes,
                    (model_capability(bytes.fromhex(plan.model_id), plan.cut),),
                )  # fmt: skip
            if registration is not None:
                check_registration(binding, registration)
            if view is not None:
                view.require_valid(RELEASE_MEASUREMENT, binding.measurement, f"edge {address}")
        except TimeoutError:
            raise DeadlineExceeded(f"handshake with {address} took over {timeout} s") from None
        except RemoteProtocolError as exc:
            if connection.state is State.ERROR:
                await stream.send_fatal(exc)
            raise
        session = Session(
            stream,
            enclave=channel.peer,
            binding=binding,
            identity=identity,
            head=head,
            plan=plan,
            domain=ledger_domain,
            timeout=timeout,
            clock=clock,
            random_bytes=random_bytes,
            first_seq=int(clock() * 1e6) if first_seq is None else first_seq,
            canonical=canonical,
        )
        async with asyncio.TaskGroup() as tasks:
            reader = tasks.create_task(session._read())
            try:
                yield session
            finally:
                await session._close()
                await asyncio.wait({reader}, timeout=CLOSE_GRACE)
                reader.cancel()
                session._fail(ChannelError("the session is closed"))
    finally:
        await stream.aclose()


def _prepare_head(model: nn.Module, plan: PartitionPlan, example: torch.Tensor | None) -> nn.Module:
    if example is None:
        return model
    from secure_ci.partition import Partitioner

    partitioner = Partitioner(model, (example,))
    if partitioner.model_id != plan.model_id:
        raise PartitionError(
            f"the model's id {partitioner.model_id[:16]}.. is not the plan's "
            f"{plan.model_id[:16]}.. (other weights or architecture)"
        )
    head, _ = partitioner.split(plan.cut)
    return head


async def _handshake(
    stream: FramedStream,
    channel: AttestedChannel,
    identity: DeviceIdentity,
    policy: Policy,
    collateral: Collateral,
    clock: Callable[[], float],
    random_bytes: Callable[[int], bytes],
    capabilities: tuple[str, ...] = (),
) -> EnclaveBinding:
    """Hello / HelloAck / Authenticate / AuthOk, then Challenge / Evidence if required."""
    device = identity.address_text
    await stream.send(Hello(versions=PROTOCOL_VERSIONS, device=device, capabilities=capabilities))
    ack = _expect(await stream.next_event(), HelloAck)
    enclave = channel.peer
    # The result key the edge announces must be the one its certificate's quote binds.
    address = bytes.fromhex(ack.enclave[2:])
    bound = hashlib.sha256(enclave_key_binding(address)).digest()
    if not hmac.compare_digest(enclave.report_data[32:64], bound):
        raise ReportDataError(
            f"the enclave's quote does not bind the result key {ack.enclave} it announced"
        )
    quote_id = bytes.fromhex(enclave.quote_id)
    digest = channel_binding(
        quote_id=quote_id, server_nonce=ack.server_nonce, session_id=ack.session_id, device=device
    )
    await stream.send(Authenticate(signature=identity.sign(digest)))
    _expect(await stream.next_event(), AuthOk)
    if policy.require_nonce:
        nonce = random_bytes(32)
        await stream.send(Challenge(nonce=nonce))
        evidence = _expect(await stream.next_event(), Evidence)
        spki = extract_evidence(channel.server_cert_der).spki_der
        await asyncio.to_thread(
            verify_quote, evidence.quote, collateral=collateral, policy=policy,
            now=int(clock()), expected_key_spki=spki, nonce=nonce,
        )  # fmt: skip
    measurement = enclave.mrenclave or hashlib.sha256(enclave.mrtd).digest()
    return EnclaveBinding(address, measurement, quote_id)


def check_registration(binding: EnclaveBinding, edge: RegisteredEdge) -> None:
    """Refuse an edge whose attested identity is not its registration, or not usable now."""
    name = edge.endpoint
    if not edge.active:
        raise AuthorizationError(f"edge {name} is revoked on the ledger")
    if not edge.measurement_allowed:
        raise AuthorizationError(
            f"edge {name}: measurement {edge.measurement.hex()} is not allowed on the ledger now"
        )
    for what, attested, registered in (
        ("enclave key", binding.address, edge.address),
        ("measurement", binding.measurement, edge.measurement),
        ("quote id", binding.quote_id, edge.quote_id),
    ):
        if not hmac.compare_digest(attested, registered):
            raise AuthorizationError(
                f"edge {name}: the attested {what} {attested.hex()} is not the registered "
                f"{registered.hex()}"
            )


def _expect(event: Event, kind: type[E]) -> E:
    if isinstance(event, kind):
        return event
    if isinstance(event, Error):
        raise RemoteProtocolError(f"edge refused: {event.reason}", code=event.code)
    if isinstance(event, Close):
        raise ChannelError("the edge closed the session during the handshake")
    raise RemoteProtocolError(
        f"expected {kind.__name__}, got {type(event).__name__}", code=ErrorCode.UNEXPECTED
    )
