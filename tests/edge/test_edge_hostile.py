"""The edge refuses hostile or broken devices with error frames and keeps serving others."""

from __future__ import annotations

import asyncio
import random
import ssl

import pytest
import torch
from edge_helpers import CUT, Served

from secure_ci.edge import EdgeLimits, _service
from secure_ci.partition import encode_features
from secure_ci.protocol import (
    Challenge,
    Error,
    ErrorCode,
    InferResult,
    Limits,
    decode_event,
    encode_event,
    encode_frame,
)
from secure_ci.protocol._frames import FrameBuffer
from secure_ci.testing import DEV_NOW, RawDevice, new_device_key

SHORT = EdgeLimits(
    handshake_timeout=0.3, idle_timeout=0.3, max_inflight_per_device=4, max_sessions=3
)


async def _ready(served: Served) -> RawDevice:
    device = await RawDevice.connect(
        served.edge.port, enclave=served.enclave, key=served.key, now_fn=lambda: DEV_NOW
    )
    await device.handshake()
    return device


def _payload(served: Served) -> bytes:
    with torch.inference_mode():
        return encode_features(served.head(torch.randn(1, 1, 32, 32)), "float32")


async def _fatal(device: RawDevice) -> Error:
    async with asyncio.timeout(10):
        while True:
            event = await device.receive()
            if isinstance(event, Error) and event.task_id is None:
                return event


async def _first_answer(device: RawDevice) -> object:
    """Parse the edge's first frame ourselves: the mutant bypassed our own state machine."""
    frames = FrameBuffer(Limits())
    while True:
        data = await device.stream.reader.read(1 << 16)
        if not data:
            return None
        for frame in frames.feed(data):
            return decode_event(frame.header, frame.payload)


async def _still_serving(served: Served) -> None:
    device = await _ready(served)
    await device.send(
        device.request(_payload(served), model_id=served.model_id, cut=CUT, codec="float32")
    )
    assert isinstance(await device.receive(), InferResult)
    await device.aclose()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\x00\x00\x00\x06\x00\x01\xff\x00\x00\x00", ErrorCode.MALFORMED),  # bad CBOR header
        (b"\x00\x00\x00\x01\x00", ErrorCode.MALFORMED),  # frame shorter than a header
        (b"\xff\xff\xff\xff", ErrorCode.FRAME_TOO_LARGE),  # refused from the prefix alone
        (b"\x00\x00\x00\x0a\x00\x08" + b"\xa1\x64type\x64nope", ErrorCode.MALFORMED),
    ],
)
async def test_malformed_and_oversized_frames_get_an_error_frame(
    served: Served, raw: bytes, code: int
) -> None:
    device = await _ready(served)
    device.stream.writer.write(raw)
    error = await _fatal(device)
    assert error.code == code, error.reason
    await device.aclose()
    await _still_serving(served)


async def test_replay_on_the_same_connection_is_refused(served: Served) -> None:
    device = await _ready(served)
    request = device.request(_payload(served), model_id=served.model_id, cut=CUT, codec="float32")
    await device.send(request)
    assert isinstance(await device.receive(), InferResult)
    device.stream.writer.write(encode_frame(*encode_event(request), Limits()))  # bypass our FSM
    assert (await _fatal(device)).code == ErrorCode.REPLAY
    await device.aclose()


async def test_replay_on_a_new_connection_is_refused(served: Served) -> None:
    first = await _ready(served)
    request = first.request(_payload(served), model_id=served.model_id, cut=CUT, codec="float32")
    await first.send(request)
    assert isinstance(await first.receive(), InferResult)
    await first.aclose()
    second = await _ready(served)
    await second.send(request)
    error = await second.receive()
    assert isinstance(error, Error)
    assert (error.code, error.task_id) == (ErrorCode.REPLAY, request.task_id)
    await second.aclose()


@pytest.mark.parametrize("served", [SHORT], indirect=True)
async def test_slow_handshake_times_out(served: Served) -> None:
    device = await RawDevice.connect(
        served.edge.port, enclave=served.enclave, key=served.key, now_fn=lambda: DEV_NOW
    )
    assert (await _fatal(device)).code == ErrorCode.TIMEOUT  # never sent Hello
    await device.aclose()


@pytest.mark.parametrize("served", [SHORT], indirect=True)
async def test_idle_session_times_out(served: Served) -> None:
    device = await _ready(served)
    assert (await _fatal(device)).code == ErrorCode.TIMEOUT
    await device.aclose()
    assert served.edge.active_sessions == 0


@pytest.mark.parametrize("served", [SHORT], indirect=True)
async def test_tcp_client_that_never_starts_tls_is_dropped(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.edge.port)
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    writer.close()


@pytest.mark.parametrize("served", [SHORT], indirect=True)
async def test_flood_from_one_device_is_bounded(served: Served) -> None:
    device = await _ready(served)
    payload = _payload(served)
    limits = Limits()
    flood = b"".join(
        encode_frame(
            *encode_event(
                device.request(payload, model_id=served.model_id, cut=CUT, codec="float32")
            ),
            limits,
        )
        for _ in range(50)
    )
    device.stream.writer.write(flood)
    assert (await _fatal(device)).code == ErrorCode.BUSY
    assert served.edge.in_flight == 0
    assert served.edge.stats["results"] <= SHORT.max_inflight_per_device
    await device.aclose()
    await _still_serving(served)


@pytest.mark.parametrize("served", [SHORT], indirect=True)
async def test_session_limit(served: Served) -> None:
    devices = [await _ready(served) for _ in range(SHORT.max_sessions)]
    extra = await RawDevice.connect(
        served.edge.port, enclave=served.enclave, key=served.key, now_fn=lambda: DEV_NOW
    )
    assert (await _fatal(extra)).code == ErrorCode.BUSY
    await extra.aclose()
    for d in devices:
        await d.aclose()


async def test_plain_tls_client_without_protocol_does_not_hurt(served: Served) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", served.edge.port, ssl=ctx)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(10):
        data = await reader.read()
    assert data  # an error frame, then the connection ends
    writer.close()
    await _still_serving(served)


@pytest.mark.parametrize("served", [SHORT], indirect=True)
async def test_mutated_request_frames_never_hurt_the_edge(served: Served) -> None:
    """Mutation fuzzing of a valid request frame: each mutant gets a result or an error."""
    rng = random.Random(1234)
    device = await _ready(served)
    good = device.request(_payload(served), model_id=served.model_id, cut=CUT, codec="float32")
    frame = bytearray(encode_frame(*encode_event(good), Limits()))
    await device.aclose()
    outcomes: dict[str, int] = {}
    for _ in range(12):
        mutant = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(mutant))
            mutant[position] = rng.randrange(256)
        if rng.random() < 0.3:
            del mutant[rng.randrange(len(mutant)) :]
        device = await _ready(served)
        device.stream.writer.write(bytes(mutant))
        try:
            async with asyncio.timeout(10):
                kind = type(await _first_answer(device)).__name__
        except TimeoutError:
            kind = "waiting"  # must not happen: a truncated frame ends in the idle timeout
        outcomes[kind] = outcomes.get(kind, 0) + 1
        await device.aclose()
    assert set(outcomes) <= {"Error", "InferResult"}, outcomes
    assert outcomes.get("Error", 0) >= 1
    await _still_serving(served)


@pytest.mark.parametrize("served", [SHORT], indirect=True)
async def test_sessions_quiet_after_an_answer_time_out_and_free_their_slots(
    served: Served,
) -> None:
    """Each of max_sessions devices gets one answer, then goes quiet: the idle timeout (re-armed
    by the answer) ends every session, and an honest device is served afterwards."""
    quiet = [await _ready(served) for _ in range(SHORT.max_sessions)]
    for device in quiet:
        await device.send(
            device.request(_payload(served), model_id=served.model_id, cut=CUT, codec="float32")
        )
        assert isinstance(await device.receive(), InferResult)
    for device in quiet:
        assert (await _fatal(device)).code == ErrorCode.TIMEOUT
        await device.aclose()
    assert served.edge.active_sessions == 0
    await _still_serving(served)


async def test_request_written_with_the_challenge_is_refused_not_answered(
    served: Served,
) -> None:
    """Rule 3: a request in the same write as the Challenge was sent before the device could
    check the fresh evidence; the edge answers the Challenge, then refuses the session."""
    device = await _ready(served)
    request = device.request(_payload(served), model_id=served.model_id, cut=CUT, codec="float32")
    limits = Limits()
    device.stream.writer.write(
        encode_frame(*encode_event(Challenge(nonce=bytes(range(32)))), limits)
        + encode_frame(*encode_event(request), limits)
    )  # both in one write, around our own state machine
    frames = FrameBuffer(limits)
    events = []
    async with asyncio.timeout(10):
        while (data := await device.stream.reader.read(1 << 16)) != b"":
            events += [decode_event(f.header, f.payload) for f in frames.feed(data)]
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["Evidence", "Error"], kinds
    assert "InferResult" not in kinds
    error = events[1]
    assert isinstance(error, Error)
    assert (error.code, error.task_id) == (ErrorCode.UNEXPECTED, None)
    assert served.edge.stats["results"] == 0
    await device.aclose()
    await _still_serving(served)


@pytest.mark.parametrize("inline_bytes", [16 << 10, 0], ids=["worker-checks", "checker-checks"])
async def test_a_request_with_a_forged_record_is_refused_and_leaves_no_record(
    served: Served, inline_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wherever the record is checked (by the worker after a lone small request's tail, or in
    a checker thread beside it), nothing is signed, journaled or answered for a request whose
    record another key signed."""
    monkeypatch.setattr(_service, "INLINE_DECODE_BYTES", inline_bytes)
    device = await _ready(served)
    forger = RawDevice(device.stream, device.enclave, new_device_key(), device.domain)
    forger.edge_address = device.edge_address
    forger.now_fn = device.now_fn
    payload = _payload(served)
    forged = forger.request(payload, model_id=served.model_id, cut=CUT, codec="float32", seq=1)
    await device.send(forged)
    error = await device.receive()
    assert isinstance(error, Error)
    assert (error.code, error.task_id) == (ErrorCode.BAD_SIGNATURE, forged.task_id)
    assert served.journal.entries == []
    honest = device.request(payload, model_id=served.model_id, cut=CUT, codec="float32", seq=2)
    await device.send(honest)
    assert isinstance(await device.receive(), InferResult)
    assert [e.request.task_id for e in served.journal.entries] == [honest.task_id]
    await device.aclose()
