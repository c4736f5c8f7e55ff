"""Property tests and mutation fuzzing of the protocol decoder and state machine.

Whatever bytes arrive, a Connection only ever raises ProtocolError subclasses; valid streams
decode to the same events however they are split; every event survives a round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_ci._encoding import canonical_cbor
from secure_ci.exceptions import LocalProtocolError, ProtocolError, RemoteProtocolError
from secure_ci.protocol import (
    NEED_DATA,
    Authenticate,
    AuthOk,
    Connection,
    Error,
    ErrorCode,
    Event,
    Hello,
    HelloAck,
    InferRequest,
    InferResult,
    Limits,
    Ping,
    Pong,
    Role,
    State,
    decode_event,
    encode_event,
    encode_frame,
)
from secure_ci.testing import connected_pair, sample_events, sample_request

LIMITS = Limits(max_frame_bytes=4096, max_header_bytes=1024, max_payload_bytes=2048)


def _drain(
    connection: Connection, data: bytes, chunks: list[int] | None = None, *, eof: bool = False
) -> list[Event]:
    """Feed ``data`` (in ``chunks`` sizes, then the end of stream if ``eof``) and collect
    events until an error or NEED_DATA."""
    events: list[Event] = []
    pieces = _split(data, chunks or [len(data) or 1]) + ([b""] if eof else [])
    try:
        for piece in pieces:
            connection.receive_data(piece, 0.0)
            for _ in range(len(data) + 1):  # bounded: at most one event per byte
                event = connection.next_event()
                if event is NEED_DATA:
                    break
                events.append(event)
                if not piece:  # end of stream: Close is repeated from now on
                    break
                _answer(connection, event)
    except ProtocolError as exc:
        failure: ProtocolError | None = exc
    else:
        failure = None
    if failure is not None:  # only peer blame, with a known code, and the connection stops
        assert isinstance(failure, RemoteProtocolError)
        assert failure.code in set(ErrorCode)
        assert connection.state is State.ERROR
        assert connection.next_deadline() is None
    return events


def _answer(connection: Connection, event: Event) -> None:
    """Play the edge's part of the handshake so that fuzzed streams reach every state."""
    if connection.our_role is Role.EDGE and isinstance(event, Hello):
        connection.send(sample_events()[1])
    elif connection.our_role is Role.EDGE and isinstance(event, Authenticate):
        connection.send(AuthOk())


def _split(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, i, k = [], 0, 0
    while i < len(data):
        size = max(1, sizes[k % len(sizes)])
        pieces.append(data[i : i + size])
        i, k = i + size, k + 1
    return pieces


def _device_stream() -> bytes:
    """Every frame a device sends in a normal session, as one byte string."""
    device, _ = connected_pair(LIMITS)
    hello, _, authenticate = sample_events()[:3]
    frames = [encode_frame(*encode_event(e), LIMITS) for e in (hello, authenticate)]
    for seq in range(1, 4):
        frames.append(device.send(sample_request(seq, payload=bytes(range(seq * 10)))))
    return b"".join(frames)


DEVICE_STREAM = _device_stream()


@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes) -> None:
    _drain(Connection(Role.EDGE, limits=LIMITS), data)
    _drain(connected_pair(LIMITS)[0], data, eof=True)
    _drain(connected_pair(LIMITS)[1], data, eof=True)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(DEVICE_STREAM)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x1B, 0xBF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = data[max(0, pos - 40) : pos]
        if not data:
            break
    return bytes(data)


@given(_mutated(), st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_mutated_streams_only_raise_protocol_errors(data: bytes, chunks: list[int]) -> None:
    _drain(Connection(Role.EDGE, limits=LIMITS), data, chunks, eof=True)


@given(st.lists(st.integers(1, 97), min_size=1, max_size=10))
def test_split_delivery_yields_the_same_events(chunks: list[int]) -> None:
    whole = _drain(Connection(Role.EDGE, limits=LIMITS), DEVICE_STREAM)
    assert len(whole) == 5
    assert _drain(Connection(Role.EDGE, limits=LIMITS), DEVICE_STREAM, chunks) == whole


def test_byte_at_a_time_delivery_yields_the_same_events() -> None:
    whole = _drain(Connection(Role.EDGE, limits=LIMITS), DEVICE_STREAM)
    assert _drain(Connection(Role.EDGE, limits=LIMITS), DEVICE_STREAM, [1]) == whole


_cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=8,
)
_field_names = st.sampled_from(
    ["type", "task_id", "cut", "codec", "signature", "versions", "device", "limits", "code"]
)


@given(
    st.sampled_from([e.TYPE for e in sample_events()]),
    st.dictionaries(_field_names, _cbor_values, max_size=9),
    st.binary(max_size=16),
)
def test_hostile_headers_only_raise_remote_errors(
    kind: str, fields: dict[str, Any], payload: bytes
) -> None:
    header = canonical_cbor({"type": kind, **fields})
    try:
        event = decode_event(header, payload)
    except RemoteProtocolError:
        return
    assert decode_event(*encode_event(event)) == event


_id32 = st.binary(min_size=32, max_size=32)
_sig = st.binary(min_size=65, max_size=65)
_u64 = st.integers(0, (1 << 64) - 1)
_text = st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), max_size=40)
_address = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())

_events = st.one_of(
    st.builds(
        Hello,
        versions=st.lists(st.integers(1, 65535), min_size=1, max_size=16).map(tuple),
        device=_address,
        capabilities=st.lists(_text, max_size=16).map(tuple),
    ),
    st.builds(
        HelloAck,
        version=st.integers(1, 65535),
        session_id=st.binary(min_size=16, max_size=16),
        server_nonce=_id32,
        enclave=_address,
        limits=st.dictionaries(_text, _u64, max_size=16),
    ),
    st.builds(
        InferRequest,
        task_id=_id32,
        model_id=_id32,
        cut=st.integers(0, 65535),
        codec=_text,
        device_seq=_u64,
        deadline=_u64,
        salt=_id32,
        payload=st.binary(max_size=256),
        signature=_sig,
    ),
    st.builds(
        InferResult,
        task_id=_id32,
        status=st.integers(0, 255),
        payload=st.binary(max_size=256),
        salt=_id32,
        edge_seq=_u64,
        latency_ms=st.integers(0, (1 << 32) - 1),
        queue_us=st.integers(0, (1 << 32) - 1),
        compute_us=st.integers(0, (1 << 32) - 1),
        signature=_sig,
    ),
    st.builds(Error, code=st.integers(0, 65535), reason=_text, task_id=st.none() | _id32),
    st.builds(Ping, nonce=_id32, padding=st.binary(max_size=256)),
    st.builds(Pong, nonce=_id32),
)


@given(_events)
def test_every_event_round_trips_through_frames(event: Event) -> None:
    frame = encode_frame(*encode_event(event), Limits())
    header_len = int.from_bytes(frame[4:6], "big")
    assert decode_event(frame[6 : 6 + header_len], frame[6 + header_len :]) == event


def _event_pool() -> list[tuple[Role, Event]]:
    """Events for both roles, including answers to a few request ids and invalid orders."""
    events = sample_events()
    result = events[7]
    assert isinstance(result, InferResult)
    pool: list[tuple[Role, Event]] = []
    for event in events:
        pool.extend((role, event) for role in Role)
    for seq in (1, 2, 3):
        request = sample_request(seq)
        pool.append((Role.DEVICE, request))
        pool.append((Role.EDGE, dataclasses.replace(result, task_id=request.task_id)))
        pool.append((Role.EDGE, Error(code=8, reason="busy", task_id=request.task_id)))
    return pool


POOL = _event_pool()


@given(st.lists(st.sampled_from(range(len(POOL))), max_size=25))
def test_both_ends_agree_on_every_transition(choices: list[int]) -> None:
    """What one end may send, the other accepts, and what it may not, the other refuses."""
    ends = {Role.DEVICE: Connection(Role.DEVICE), Role.EDGE: Connection(Role.EDGE)}
    for index in choices:
        role, event = POOL[index]
        sender, receiver = ends[role], ends[role.peer]
        try:
            data = sender.send(event)
        except LocalProtocolError:
            receiver.receive_data(encode_frame(*encode_event(event), LIMITS), 0.0)
            with pytest.raises(RemoteProtocolError):
                receiver.next_event()
            return
        receiver.receive_data(data, 0.0)
        assert receiver.next_event() == event
        assert sender.state == receiver.state
        assert sender.in_flight == receiver.in_flight
