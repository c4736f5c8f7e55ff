"""Events and frames: round trips, strict header validation, size limits."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from secure_ci._encoding import canonical_cbor
from secure_ci.exceptions import ConfigError, LocalProtocolError, RemoteProtocolError
from secure_ci.protocol import (
    Close,
    Error,
    ErrorCode,
    Event,
    Hello,
    InferRequest,
    Limits,
    decode_event,
    encode_event,
    encode_frame,
)
from secure_ci.protocol._frames import FrameBuffer
from secure_ci.testing import sample_events, sample_request


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: type(e).__name__)
def test_every_event_round_trips(event: Event) -> None:
    header, payload = encode_event(event)
    assert decode_event(header, payload) == event


def test_frame_layout_is_prefix_header_payload() -> None:
    header, payload = encode_event(sample_request(payload=b"abc"))
    frame = encode_frame(header, payload, Limits())
    (body_len,) = struct.unpack(">I", frame[:4])
    (header_len,) = struct.unpack(">H", frame[4:6])
    assert body_len == len(frame) - 4
    assert header_len == len(header)
    assert frame.endswith(b"abc")


def _header(event: Event, **changes: object) -> bytes:
    header, _ = encode_event(event)
    from secure_ci._encoding import decode_cbor

    value = decode_cbor(header)
    value.update(changes)
    return canonical_cbor({k: v for k, v in value.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "what"),
    [
        ({"task_id": b"\x00" * 31}, "short task id"),
        ({"signature": b"\x00" * 64}, "short signature"),
        ({"cut": -1}, "negative cut"),
        ({"cut": True}, "bool as int"),
        ({"device_seq": 1 << 64}, "seq overflow"),
        ({"codec": "x" * 300}, "long codec"),
        ({"codec": "a\nb"}, "unprintable codec"),
        ({"salt": "00" * 32}, "hex string instead of bytes"),
        ({"extra": 1}, "unknown field"),
        ({"deadline": _DROP}, "missing field"),
        ({"type": "nope"}, "unknown type"),
        ({"type": 3}, "non-string type"),
        ({"payload": b"x"}, "payload field in header"),
    ],
)
def test_malformed_headers_are_refused(changes: dict[str, object], what: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_event(_header(sample_request(), **changes), b"")
    assert info.value.code == ErrorCode.MALFORMED, what


def test_header_must_be_canonical_cbor_map() -> None:
    for header in (b"\xff", canonical_cbor([1, 2]), b"\xa1\x64type\x65close\x00", b"\xbf\xff"):
        with pytest.raises(RemoteProtocolError):
            decode_event(header, b"")


def test_payload_on_payloadless_event_is_refused() -> None:
    header, _ = encode_event(Close())
    with pytest.raises(RemoteProtocolError, match="no payload"):
        decode_event(header, b"x")


def test_invalid_local_event_raises_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Hello(versions=(), device="0x" + "11" * 20)
    with pytest.raises(LocalProtocolError):
        Hello(versions=(1,), device="not-an-address")
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(sample_request(), signature=b"short")


def test_error_from_exception_keeps_code_and_sanitises_reason() -> None:
    exc = RemoteProtocolError("bad\nthing" + "!" * 500, code=ErrorCode.REPLAY)
    error = Error.from_exception(exc, task_id=b"\x01" * 32)
    assert error.code == ErrorCode.REPLAY
    assert "\n" not in error.reason
    assert len(error.reason) == 256


def test_lists_become_tuples() -> None:
    hello = Hello(versions=[1], device="0x" + "ab" * 20, capabilities=["a"])  # type: ignore[arg-type]
    assert hello.versions == (1,)
    assert hello.capabilities == ("a",)
    assert isinstance(hash(hello), int)


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        Limits(max_header_bytes=70_000)
    with pytest.raises(ConfigError):
        Limits(idle_timeout=0)
    with pytest.raises(ConfigError):
        Limits(max_in_flight=0)


def test_oversized_frame_refused_from_prefix_alone() -> None:
    buffer = FrameBuffer(Limits(max_frame_bytes=100))
    with pytest.raises(RemoteProtocolError) as info:
        buffer.feed(struct.pack(">I", 101))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_oversized_header_and_payload_refused() -> None:
    limits = Limits(max_header_bytes=10, max_payload_bytes=5, max_frame_bytes=1000)
    with pytest.raises(RemoteProtocolError) as info:
        FrameBuffer(limits).feed(struct.pack(">IH", 50, 11))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(RemoteProtocolError) as info:
        FrameBuffer(limits).feed(struct.pack(">IH", 2 + 4 + 6, 4))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(RemoteProtocolError):
        FrameBuffer(limits).feed(struct.pack(">IH", 5, 9))  # header longer than the frame
    with pytest.raises(LocalProtocolError):
        encode_frame(b"h", b"123456", limits)


def test_frame_buffer_splits_many_frames_and_keeps_remainder() -> None:
    limits = Limits()
    frames = b"".join(encode_frame(*encode_event(e), limits) for e in sample_events())
    buffer = FrameBuffer(limits)
    got = buffer.feed(frames + frames[:7])
    assert len(got) == len(sample_events())
    assert buffer.pending == 7
    assert [decode_event(f.header, f.payload) for f in got] == sample_events()


def test_request_fields_keep_their_types() -> None:
    request = decode_event(*encode_event(sample_request(seq=5)))
    assert isinstance(request, InferRequest)
    assert request.device_seq == 5
