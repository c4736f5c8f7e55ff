"""Protocol fixtures: one valid value of every event, and a handshaken connection pair."""

from __future__ import annotations

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
    InferResult,
    Limits,
    Role,
)

__all__ = ["connected_pair", "pump", "sample_events", "sample_request"]

DEVICE_ADDRESS = "0x" + "11" * 20
ENCLAVE_ADDRESS = "0x" + "22" * 20


def sample_request(seq: int = 0, payload: bytes = b"features") -> InferRequest:
    """A well-formed request (dummy signature) with a task id derived from ``seq``."""
    return InferRequest(
        task_id=seq.to_bytes(32, "big"),
        model_id=b"\x05" * 32,
        cut=3,
        codec="int8",
        device_seq=seq,
        deadline=1_700_000_000,
        salt=b"\x07" * 32,
        payload=payload,
        signature=b"\x01" * 65,
    )


def sample_events() -> list[Event]:
    """One valid value of every event type, in handshake-then-traffic order."""
    request = sample_request()
    return [
        Hello(versions=PROTOCOL_VERSIONS, device=DEVICE_ADDRESS, capabilities=("int8",)),
        HelloAck(
            version=PROTOCOL_VERSIONS[-1],
            session_id=b"\x03" * 16,
            server_nonce=b"\x04" * 32,
            enclave=ENCLAVE_ADDRESS,
            limits={"max_in_flight": 8},
        ),
        Authenticate(signature=b"\x02" * 65),
        AuthOk(),
        Challenge(nonce=b"\x09" * 32),
        Evidence(quote=b"quote" * 10),
        request,
        InferResult(
            task_id=request.task_id,
            status=0,
            payload=b"output",
            salt=b"\x08" * 32,
            edge_seq=1,
            latency_ms=12,
            signature=b"\x06" * 65,
        ),
        Error(code=ErrorCode.BUSY, reason="busy", task_id=b"\x0a" * 32),
        Close(),
    ]


def pump(sender: Connection, receiver: Connection, event: Event, now: float = 0.0) -> Event:
    """Send ``event`` from ``sender`` and return what ``receiver`` makes of the bytes."""
    receiver.receive_data(sender.send(event), now)
    received = receiver.next_event()
    if not isinstance(received, Event):
        raise AssertionError(f"expected an event, got {received!r}")
    return received


def connected_pair(limits: Limits | None = None, now: float = 0.0) -> tuple[Connection, Connection]:
    """A (device, edge) pair of connections that completed the handshake at ``now``."""
    device = Connection(Role.DEVICE, limits=limits, now=now)
    edge = Connection(Role.EDGE, limits=limits, now=now)
    hello, ack, auth, ok = sample_events()[:4]
    pump(device, edge, hello, now)
    pump(edge, device, ack, now)
    pump(device, edge, auth, now)
    pump(edge, device, ok, now)
    return device, edge
