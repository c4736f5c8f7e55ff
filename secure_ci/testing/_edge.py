"""Fakes for edge tests and benchmarks: a simulated enclave and a bare protocol device.

``DevEnclave`` bundles a dev PKI, a simulated provider and a policy that trusts exactly that
dev root and measurement. ``RawDevice`` speaks the wire protocol directly (attested connect,
handshake, signed requests) so tests can also send what a correct device never would.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from secure_ci.attestation import Collateral, DevPKI, Policy, SimulatedProvider, VerifiedEnclave
from secure_ci.channel import FramedStream, connect_attested
from secure_ci.device._identity import DeviceIdentity
from secure_ci.device._tasks import EnclaveBinding, sign_request
from secure_ci.edge._config import format_address, parse_address
from secure_ci.exceptions import RemoteProtocolError
from secure_ci.ledger._records import (
    LedgerDomain,
    address_of,
    sign_digest,
)
from secure_ci.protocol import (
    PROTOCOL_VERSIONS,
    Authenticate,
    AuthOk,
    Connection,
    Error,
    ErrorCode,
    Event,
    Hello,
    HelloAck,
    InferRequest,
    Limits,
    Role,
    channel_binding,
)
from secure_ci.testing._attestation import dev_pki, dev_policy, dev_provider

__all__ = ["DevEnclave", "RawDevice", "dev_enclave", "new_device_key"]


@dataclass(frozen=True)
class DevEnclave:
    """A simulated enclave identity and the device-side policy that accepts it."""

    pki: DevPKI = field(repr=False)
    provider: SimulatedProvider = field(repr=False)
    policy: Policy
    collateral: Collateral = field(repr=False)


def dev_enclave(now: int, *, debug: bool = False, **policy: Any) -> DevEnclave:
    """A fresh dev PKI at ``now``, the dev enclave on it, and a policy trusting both."""
    pki = dev_pki(now)
    return DevEnclave(
        pki, dev_provider(pki, debug=debug), dev_policy(pki, **policy), pki.collateral
    )


def new_device_key() -> bytes:
    """A fresh secp256k1 device identity key."""
    while True:
        key = os.urandom(32)
        try:
            address_of(key)
            return key
        except Exception:  # noqa: S112 - out of range: draw again
            continue


def _refused(event: Event, expected: str) -> RemoteProtocolError:
    if isinstance(event, Error):
        return RemoteProtocolError(f"edge refused: {event.reason}", code=event.code)
    return RemoteProtocolError(
        f"expected {expected}, got {type(event).__name__}", code=ErrorCode.UNEXPECTED
    )


class RawDevice:
    """A minimal device over the real attested channel: no head, no retries, no policy games."""

    def __init__(
        self,
        stream: FramedStream,
        enclave: VerifiedEnclave,
        key: bytes,
        domain: LedgerDomain,
    ) -> None:
        self.stream = stream
        self.enclave = enclave
        self.key = key
        self.address = address_of(key)
        self.domain = domain
        self.edge_address = b""
        self._seq = itertools.count(1)
        self.now_fn: Callable[[], float] = time.time

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        enclave: DevEnclave,
        key: bytes,
        domain: LedgerDomain | None = None,
        now_fn: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
    ) -> RawDevice:
        channel = await connect_attested(
            host, port, policy=enclave.policy, collateral=enclave.collateral, now_fn=now_fn
        )
        conn = Connection(Role.DEVICE, limits=Limits(), now=time.monotonic())
        stream = FramedStream(channel.reader, channel.writer, conn)
        device = cls(stream, channel.peer, key, domain or LedgerDomain(0, bytes(20)))
        device.now_fn = now_fn
        return device

    async def handshake(self) -> HelloAck:
        """Hello, then Authenticate with the channel binding; returns the HelloAck."""
        device = format_address(self.address)
        await self.stream.send(Hello(versions=PROTOCOL_VERSIONS, device=device))
        ack = await self.stream.next_event()
        if not isinstance(ack, HelloAck):
            raise _refused(ack, "HelloAck")
        self.edge_address = parse_address(ack.enclave)
        binding = channel_binding(
            quote_id=bytes.fromhex(self.enclave.quote_id),
            server_nonce=ack.server_nonce,
            session_id=ack.session_id,
            device=device,
        )
        await self.stream.send(Authenticate(signature=sign_digest(self.key, binding)))
        ok = await self.stream.next_event()
        if not isinstance(ok, AuthOk):
            raise _refused(ok, "AuthOk")
        return ack

    def request(
        self,
        payload: bytes,
        *,
        model_id: bytes,
        cut: int,
        codec: str,
        deadline: int | None = None,
        task_id: bytes | None = None,
        seq: int | None = None,
    ) -> InferRequest:
        """A correctly signed request for ``payload`` (the device library's own signing);
        the deadline defaults to a minute from the device's clock."""
        event, _ = sign_request(
            DeviceIdentity(self.key),
            enclave=EnclaveBinding(self.edge_address, bytes(32), bytes(32)),
            domain=self.domain,
            task_id=task_id,
            model_id=model_id,
            cut=cut,
            codec=codec,
            device_seq=next(self._seq) if seq is None else seq,
            deadline=int(self.now_fn()) + 60 if deadline is None else deadline,
            salt=os.urandom(32),
            payload=payload,
        )
        return event

    async def send(self, event: Event) -> None:
        await self.stream.send(event)

    async def receive(self) -> Event:
        return await self.stream.next_event()

    async def aclose(self) -> None:
        await self.stream.aclose()
