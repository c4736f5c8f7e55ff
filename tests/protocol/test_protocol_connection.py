"""The Connection state machine: handshake, pipelining, replay, limits, timers, closing."""

from __future__ import annotations

import dataclasses

import pytest

from secure_ci.exceptions import LocalProtocolError, RemoteProtocolError
from secure_ci.protocol import (
    NEED_DATA,
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
    State,
    encode_event,
    encode_frame,
)
from secure_ci.testing import connected_pair, pump, sample_events, sample_request


def _result(task_id: bytes) -> InferResult:
    result = sample_events()[7]
    assert isinstance(result, InferResult)
    return dataclasses.replace(result, task_id=task_id)


def test_handshake_reaches_ready_and_negotiates_version() -> None:
    device, edge = connected_pair()
    assert device.state is edge.state is State.READY
    assert device.version == edge.version == 3  # v3: InferResult.queue_us, compute_us
    assert edge.hello is not None
    assert edge.hello.device == "0x" + "11" * 20
    assert device.max_in_flight == 8  # lowered to what the edge announced
    assert edge.next_event() is NEED_DATA


def test_events_out_of_order_are_local_errors_and_change_nothing() -> None:
    device = Connection(Role.DEVICE, now=0.0)
    with pytest.raises(LocalProtocolError) as info:
        device.send(sample_request())
    assert info.value.code == ErrorCode.UNEXPECTED
    assert device.state is State.AWAIT_HELLO
    with pytest.raises(LocalProtocolError):
        device.send(AuthOk())  # an edge event


def test_peer_sending_out_of_order_is_remote_error_and_sticky() -> None:
    device, edge = Connection(Role.DEVICE), Connection(Role.EDGE)
    device_ready, _ = connected_pair()
    edge.receive_data(device_ready.send(sample_request()), 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        edge.next_event()
    assert info.value.code == ErrorCode.UNEXPECTED
    assert edge.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        edge.next_event()
    # After a violation only a fatal error and Close may go out.
    with pytest.raises(LocalProtocolError):
        edge.send(AuthOk())
    edge.send(Error.from_exception(info.value))
    assert edge.state is State.CLOSED
    del device


def test_unoffered_version_is_refused_by_the_device() -> None:
    device, edge = Connection(Role.DEVICE), Connection(Role.EDGE)
    hello, ack = sample_events()[:2]
    assert isinstance(ack, HelloAck)
    pump(device, edge, hello)
    bogus = dataclasses.replace(ack, version=7)
    with pytest.raises(LocalProtocolError) as local:
        edge.send(bogus)
    assert local.value.code == ErrorCode.UNSUPPORTED_VERSION
    # A hostile edge that sends it anyway is caught on the device side.
    device.receive_data(encode_frame(*encode_event(bogus), Limits()), 0.0)
    with pytest.raises(RemoteProtocolError) as remote:
        device.next_event()
    assert remote.value.code == ErrorCode.UNSUPPORTED_VERSION


def test_pipelined_requests_are_matched_by_task_id_in_any_order() -> None:
    device, edge = connected_pair()
    requests = [sample_request(seq) for seq in range(1, 4)]
    for request in requests:
        assert pump(device, edge, request) == request
    assert edge.in_flight == tuple(r.task_id for r in requests)
    for request in reversed(requests):
        assert pump(edge, device, _result(request.task_id)).task_id == request.task_id  # type: ignore[attr-defined]
    assert device.in_flight == edge.in_flight == ()


def test_result_for_unknown_task_is_refused() -> None:
    device, edge = connected_pair()
    with pytest.raises(LocalProtocolError):
        edge.send(_result(b"\x09" * 32))
    pump(device, edge, sample_request(1))
    rogue_edge = connected_pair()[1]
    pump(connected_pair()[0], rogue_edge, sample_request(2))  # rogue knows a different task
    device.receive_data(rogue_edge.send(_result(sample_request(2).task_id)), 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        device.next_event()
    assert info.value.code == ErrorCode.UNEXPECTED


def test_task_error_ends_one_task_and_keeps_the_connection() -> None:
    device, edge = connected_pair()
    request = sample_request(1)
    pump(device, edge, request)
    error = Error(code=ErrorCode.BAD_TENSOR, reason="bad shape", task_id=request.task_id)
    assert pump(edge, device, error) == error
    assert device.state is State.READY
    assert device.in_flight == ()


def test_fatal_error_ends_the_connection() -> None:
    device, edge = connected_pair()
    pump(edge, device, Error(code=ErrorCode.SHUTTING_DOWN, reason="bye"))
    assert device.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        device.send(sample_request(1))


@pytest.mark.parametrize("seq_and_id", [(1, 1), (2, 1), (0, 3)])
def test_replayed_task_or_sequence_is_refused(seq_and_id: tuple[int, int]) -> None:
    device, edge = connected_pair()
    first = sample_request(1)
    pump(device, edge, first)
    pump(edge, device, _result(first.task_id))
    seq, task = seq_and_id
    replay = dataclasses.replace(first, device_seq=seq, task_id=task.to_bytes(32, "big"))
    with pytest.raises(LocalProtocolError) as local:
        device.send(replay)
    assert local.value.code == ErrorCode.REPLAY
    # Bytes captured from the wire and re-sent by an attacker: the edge refuses.
    _, fresh_edge = connected_pair()
    fresh_edge.receive_data(connected_pair()[0].send(first), 0.0)
    fresh_edge.next_event()
    fresh_edge.receive_data(connected_pair()[0].send(replay), 0.0)
    with pytest.raises(RemoteProtocolError) as remote:
        fresh_edge.next_event()
    assert remote.value.code == ErrorCode.REPLAY


def test_in_flight_limit_is_enforced_both_ways() -> None:
    limits = Limits(max_in_flight=2)
    device, edge = connected_pair(limits)
    pump(device, edge, sample_request(1))
    pump(device, edge, sample_request(2))
    with pytest.raises(LocalProtocolError) as local:
        device.send(sample_request(3))
    assert local.value.code == ErrorCode.BUSY
    flooder, _ = connected_pair(Limits(max_in_flight=10))
    for seq in (1, 2):
        flooder.send(sample_request(seq))
    edge.receive_data(flooder.send(sample_request(3)), 0.0)
    with pytest.raises(RemoteProtocolError) as remote:
        edge.next_event()
    assert remote.value.code == ErrorCode.BUSY


def test_challenge_blocks_requests_until_evidence() -> None:
    device, edge = connected_pair()
    pump(device, edge, sample_request(1))
    pump(device, edge, Challenge(nonce=b"\x01" * 32))
    with pytest.raises(LocalProtocolError):
        device.send(sample_request(2))
    pump(edge, device, _result(sample_request(1).task_id))  # in-flight answers continue
    pump(edge, device, Evidence(quote=b"q"))
    assert device.state is State.READY
    pump(device, edge, sample_request(2))


def _raw(event: Event) -> bytes:
    """Frame bytes written around our own state machine (a hostile device)."""
    return encode_frame(*encode_event(event), Limits())


@pytest.mark.parametrize("split", [None, 5], ids=["whole", "partial"])
def test_request_in_the_same_read_as_challenge_is_refused(split: int | None) -> None:
    """Rule 3 for frames already received when the Evidence goes out: the device cannot
    have seen it, so a request among them is a violation (whole or begun frames)."""
    _, edge = connected_pair()
    request = _raw(sample_request(1))
    tail = request if split is None else request[:split]
    edge.receive_data(_raw(Challenge(nonce=b"\x01" * 32)) + tail, 0.0)
    assert isinstance(edge.next_event(), Challenge)
    edge.send(Evidence(quote=b"q"))
    assert edge.state is State.READY
    if split is not None:
        assert edge.next_event() is NEED_DATA
        edge.receive_data(request[split:], 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        edge.next_event()
    assert info.value.code == ErrorCode.UNEXPECTED
    assert edge.state is State.ERROR


def test_frames_after_the_evidence_and_close_before_it_are_fine() -> None:
    _, edge = connected_pair()
    edge.receive_data(_raw(Challenge(nonce=b"\x01" * 32)), 0.0)
    assert isinstance(edge.next_event(), Challenge)
    edge.send(Evidence(quote=b"q"))
    edge.receive_data(_raw(sample_request(1)), 0.0)  # sent after the device saw Evidence
    assert isinstance(edge.next_event(), InferRequest)
    edge.receive_data(_raw(Challenge(nonce=b"\x02" * 32)) + _raw(Close()), 0.0)
    assert isinstance(edge.next_event(), Challenge)
    edge.send(Evidence(quote=b"q"))
    assert edge.next_event() == Close()


def test_close_from_device_lets_edge_drain_then_close() -> None:
    device, edge = connected_pair()
    request = sample_request(1)
    pump(device, edge, request)
    pump(device, edge, Close())
    assert edge.their_closed
    assert not edge.our_closed
    with pytest.raises(LocalProtocolError):
        device.send(sample_request(2))
    pump(edge, device, _result(request.task_id))
    pump(edge, device, Close())
    assert device.state is edge.state is State.CLOSED


def test_end_of_stream_without_close_is_an_error() -> None:
    _, edge = connected_pair()
    edge.receive_data(b"", 1.0)
    with pytest.raises(RemoteProtocolError) as info:
        edge.next_event()
    assert info.value.code == ErrorCode.UNEXPECTED


def test_end_of_stream_inside_a_frame_is_malformed() -> None:
    device, edge = connected_pair()
    data = device.send(sample_request(1))
    edge.receive_data(data[:-1], 0.0)
    edge.receive_data(b"", 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        edge.next_event()
    assert info.value.code == ErrorCode.MALFORMED


def test_end_of_stream_after_close_is_clean() -> None:
    device, edge = connected_pair()
    pump(device, edge, Close())
    assert edge.next_event() is NEED_DATA
    edge.receive_data(b"", 0.0)
    assert edge.next_event() == Close()
    assert edge.next_event() == Close()
    assert edge.their_closed
    assert edge.state is State.READY  # the edge may still answer and close


def test_handshake_timeout() -> None:
    edge = Connection(Role.EDGE, limits=Limits(handshake_timeout=5.0), now=100.0)
    assert edge.next_deadline() == 105.0
    edge.handle_timer(104.9)
    with pytest.raises(RemoteProtocolError) as info:
        edge.handle_timer(105.0)
    assert info.value.code == ErrorCode.TIMEOUT
    assert edge.state is State.ERROR
    assert edge.next_deadline() is None
    with pytest.raises(RemoteProtocolError):
        edge.next_event()


def test_handshake_clock_starts_at_first_observation() -> None:
    edge = Connection(Role.EDGE, limits=Limits(handshake_timeout=5.0))
    assert edge.next_deadline() is None
    edge.receive_data(b"\x00", 50.0)  # a byte of a frame prefix
    assert edge.next_deadline() == 55.0


def test_idle_timer_never_fires_with_work_in_flight() -> None:
    limits = Limits(idle_timeout=30.0)
    device, edge = connected_pair(limits, now=0.0)
    assert edge.next_deadline() == 30.0
    request = sample_request(1)
    edge.receive_data(device.send(request), 10.0)
    edge.next_event()
    assert edge.next_deadline() == 40.0  # armed: the driver wakes and re-arms
    edge.handle_timer(1000.0)  # working on a task: never idle
    assert edge.state is State.READY
    assert edge.next_deadline() == 1030.0
    edge.send(_result(request.task_id), now=1010.0)
    assert edge.next_deadline() == 1040.0
    with pytest.raises(RemoteProtocolError) as info:
        edge.handle_timer(1040.0)
    assert info.value.code == ErrorCode.TIMEOUT


def test_idle_deadline_computed_before_the_answer_is_rearmed_after_it() -> None:
    """A driver that took the deadline while a task was in flight (and slept on it) wakes
    up in time to see the session go quiet after the answer: a slot is never held forever."""
    device, edge = connected_pair(Limits(idle_timeout=30.0), now=0.0)
    request = sample_request(1)
    edge.receive_data(device.send(request), 10.0)
    edge.next_event()
    slept_until = edge.next_deadline()
    assert slept_until == 40.0
    edge.send(_result(request.task_id), now=12.0)  # answered; the device goes quiet
    edge.handle_timer(slept_until)  # not yet idle for 30 s: re-armed from the answer
    assert edge.next_deadline() == 42.0
    with pytest.raises(RemoteProtocolError) as info:
        edge.handle_timer(42.0)
    assert info.value.code == ErrorCode.TIMEOUT


def test_trickled_partial_frame_does_not_reset_idle_timer() -> None:
    device, edge = connected_pair(Limits(idle_timeout=30.0), now=0.0)
    data = device.send(sample_request(1))
    for i, byte in enumerate(data[:-1]):
        edge.receive_data(bytes([byte]), float(i))
    assert edge.next_deadline() == 30.0


def test_hello_is_sent_once() -> None:
    device = Connection(Role.DEVICE)
    hello = sample_events()[0]
    assert isinstance(hello, Hello)
    device.send(hello)
    with pytest.raises(LocalProtocolError):
        device.send(hello)


def test_protocol_imports_no_io_or_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, secure_ci.protocol; "
        "print(sorted(m for m in ('torch', 'asyncio', 'ssl', 'socket', 'web3') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_idle_timer_can_be_turned_off() -> None:
    device, _ = connected_pair(Limits(idle_timeout=None), now=0.0)
    assert device.next_deadline() is None
    device.handle_timer(1e9)
    assert device.state is State.READY


def test_a_ping_is_answered_by_its_pong_one_at_a_time() -> None:
    from secure_ci.protocol import Ping, Pong

    device, edge = connected_pair()
    ping = Ping(nonce=b"\x01" * 32, padding=bytes(100))
    assert pump(device, edge, ping) == ping
    with pytest.raises(LocalProtocolError):  # one at a time
        device.send(Ping(nonce=b"\x02" * 32))
    with pytest.raises(LocalProtocolError):  # a pong must answer the ping
        edge.send(Pong(nonce=b"\x03" * 32))
    pump(device, edge, sample_request(1))  # requests go on meanwhile
    assert pump(edge, device, Pong(nonce=ping.nonce)) == Pong(nonce=ping.nonce)
    assert pump(device, edge, Ping(nonce=b"\x02" * 32)).nonce == b"\x02" * 32  # type: ignore[attr-defined]


def test_an_unasked_pong_from_the_edge_is_a_protocol_error() -> None:
    from secure_ci.protocol import Ping, Pong

    device, edge = connected_pair()
    rogue = connected_pair()[1]
    pump(connected_pair()[0], rogue, Ping(nonce=b"\x04" * 32))
    device.receive_data(rogue.send(Pong(nonce=b"\x04" * 32)), 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        device.next_event()
    assert info.value.code == ErrorCode.UNEXPECTED
    assert edge.state is State.READY
