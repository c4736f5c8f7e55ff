"""The edge service over real TLS 1.3 on loopback with a simulated enclave."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading

import pytest
import torch
from edge_helpers import CUT, Served, registry

from secure_ci.edge import EdgeConfig, EdgeLimits, open_edge
from secure_ci.exceptions import ChannelError, RemoteProtocolError, SecureCIError
from secure_ci.ledger import open_output
from secure_ci.ledger._records import LedgerDomain, TaskRequest, TaskResult, commitment
from secure_ci.partition import DEFAULT_CANONICAL, canonical_bytes, decode_features, encode_features
from secure_ci.protocol import Close, Error, ErrorCode, Hello, InferRequest, InferResult
from secure_ci.testing import DEV_NOW, RawDevice, dev_enclave, new_device_key


async def _device(served: Served, key: bytes | None = None) -> RawDevice:
    return await RawDevice.connect(
        served.edge.port, enclave=served.enclave, key=key or served.key, now_fn=lambda: DEV_NOW
    )


def _features(served: Served, x: torch.Tensor, codec: str = "float32") -> bytes:
    with torch.inference_mode():
        return encode_features(served.head(x), codec)


@pytest.mark.parametrize(
    "served",
    [EdgeLimits(max_wait_ms=1.0), EdgeLimits(max_wait_ms=1.0, signing_workers=1)],
    indirect=True,
    ids=["inline-signing", "signing-process"],
)
async def test_pipelined_requests_match_local_inference_and_are_signed(served: Served) -> None:
    device = await _device(served)
    await device.handshake()
    assert device.enclave.mrenclave == served.edge.identity.measurement
    xs = [torch.randn(1, 1, 32, 32) for _ in range(6)]
    requests = [
        device.request(_features(served, x), model_id=served.model_id, cut=CUT, codec="float32")
        for x in xs
    ]
    for r in requests:
        await device.send(r)
    answers = {}
    for _ in requests:
        event = await device.receive()
        assert isinstance(event, InferResult)
        answers[event.task_id] = event
    domain = LedgerDomain(0, bytes(20))
    for x, r in zip(xs, requests, strict=True):
        result = answers[r.task_id]
        (out,) = decode_features(result.payload)
        with torch.inference_mode():
            expected = served.model(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        record = TaskRequest(
            r.task_id, device.address, r.device_seq, r.model_id, r.cut,
            commitment(r.salt, r.payload), device.edge_address, r.deadline,
        )  # fmt: skip
        receipt = TaskResult(
            r.task_id, record.struct_hash(),
            open_output(
                result.salt, r.salt, canonical_bytes(DEFAULT_CANONICAL, result.payload),
                result.payload,
            ).commitment(),
            served.edge.identity.measurement, bytes.fromhex(device.enclave.quote_id),
            0, result.latency_ms, result.edge_seq,
        )  # fmt: skip
        assert receipt.recover(result.signature, domain) == device.edge_address
    assert len(served.journal.entries) == 6
    assert {e.request.task_id for e in served.journal.entries} == set(answers)
    await device.send(Close())
    assert isinstance(await device.receive(), Close)
    await device.aclose()


async def test_int8_codec_is_within_tolerance(served: Served) -> None:
    device = await _device(served)
    await device.handshake()
    x = torch.randn(1, 1, 32, 32)
    await device.send(
        device.request(
            _features(served, x, "int8"), model_id=served.model_id, cut=CUT, codec="int8"
        )
    )
    result = await device.receive()
    assert isinstance(result, InferResult)
    (out,) = decode_features(result.payload)
    with torch.inference_mode():
        expected = served.model(x)
    assert torch.argmax(out) == torch.argmax(expected) or (out - expected).abs().max() < 0.05
    await device.aclose()


async def test_concurrent_devices_are_batched(served: Served) -> None:
    keys = [served.key] * 8
    devices = [await _device(served, k) for k in keys]
    for d in devices:
        await d.handshake()
    x = torch.randn(1, 1, 32, 32)
    payload = _features(served, x)

    async def one(d: RawDevice) -> InferResult:
        await d.send(d.request(payload, model_id=served.model_id, cut=CUT, codec="float32"))
        event = await d.receive()
        assert isinstance(event, InferResult)
        return event

    for _ in range(3):
        await asyncio.gather(*(one(d) for d in devices))
    batcher = next(iter(served.edge._batchers.values()))
    assert batcher.items_run == 24
    assert batcher.batches_run < 24
    for d in devices:
        await d.aclose()


async def test_unknown_device_gets_unauthorized_error(served: Served) -> None:
    device = await _device(served, new_device_key())
    with pytest.raises(RemoteProtocolError) as refused:
        await device.handshake()
    assert refused.value.code == ErrorCode.UNAUTHORIZED
    await device.aclose()
    assert served.edge.active_sessions == 0


async def test_task_errors_keep_the_session_alive(served: Served) -> None:
    device = await _device(served)
    await device.handshake()
    good = _features(served, torch.randn(1, 1, 32, 32))
    wrong_shape = encode_features([torch.randn(1, 8, 8, 8)], "float32")
    wrong_dtype = encode_features([torch.randn(1, 8, 16, 16).double()], "float32")
    cases = [
        (device.request(wrong_shape, model_id=served.model_id, cut=CUT, codec="float32"), 6),
        (device.request(wrong_dtype, model_id=served.model_id, cut=CUT, codec="float32"), 6),
        (device.request(b"garbage", model_id=served.model_id, cut=CUT, codec="float32"), 6),
        (device.request(good, model_id=served.model_id, cut=CUT, codec="int4"), 6),
        (device.request(good, model_id=bytes(32), cut=CUT, codec="float32"), 5),
        (device.request(good, model_id=served.model_id, cut=CUT + 1, codec="float32"), 5),
        (device.request(good, model_id=served.model_id, cut=CUT, codec="float32", deadline=5), 9),
    ]
    forged = device.request(good, model_id=served.model_id, cut=CUT, codec="float32")
    other = RawDevice(device.stream, device.enclave, new_device_key(), device.domain)
    other.edge_address = device.edge_address
    other.now_fn = device.now_fn
    resigned = other.request(
        good, model_id=served.model_id, cut=CUT, codec="float32", seq=next(device._seq)
    )
    cases.append((resigned, ErrorCode.BAD_SIGNATURE))
    del forged
    for request, code in cases:
        await device.send(request)
        event = await device.receive()
        assert isinstance(event, Error), event
        assert (event.code, event.task_id) == (code, request.task_id), event.reason
    await device.send(device.request(good, model_id=served.model_id, cut=CUT, codec="float32"))
    assert isinstance(await device.receive(), InferResult)
    assert served.edge.stats["task_errors"] == len(cases)
    await device.aclose()


async def test_fresh_evidence_binds_the_nonce(served: Served) -> None:
    from secure_ci.attestation import extract_evidence, verify_quote
    from secure_ci.exceptions import ReportDataError
    from secure_ci.protocol import Challenge, Evidence

    device = await _device(served)
    await device.handshake()
    nonce = b"\x42" * 32
    await device.send(Challenge(nonce=nonce))
    evidence = await device.receive()
    assert isinstance(evidence, Evidence)
    spki = extract_evidence(device.stream.writer.get_extra_info("ssl_object").getpeercert(True))
    common = {
        "collateral": served.enclave.collateral,
        "policy": served.enclave.policy,
        "now": DEV_NOW,
        "expected_key_spki": spki.spki_der,
    }
    verified = verify_quote(evidence.quote, nonce=nonce, **common)  # type: ignore[arg-type]
    assert verified.mrenclave == served.edge.identity.measurement
    with pytest.raises(ReportDataError):
        verify_quote(evidence.quote, nonce=b"\x41" * 32, **common)  # type: ignore[arg-type]
    await device.aclose()


async def test_shutdown_drains_in_flight_requests(served: Served) -> None:
    device = await _device(served)
    await device.handshake()
    requests = [
        device.request(
            _features(served, torch.randn(1, 1, 32, 32)),
            model_id=served.model_id,
            cut=CUT,
            codec="float32",
        )
        for _ in range(4)
    ]
    hold = threading.Event()
    served.edge._executor.submit(hold.wait, 10)  # the tail worker is busy: requests wait
    for r in requests:
        await device.send(r)
    async with asyncio.timeout(10):
        while served.edge.in_flight < len(requests):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    closing = asyncio.create_task(served.edge._drain(set()))
    await asyncio.sleep(0.05)
    assert not closing.done()  # draining waits for the in-flight tasks
    hold.set()
    answered = set()
    async with asyncio.timeout(20):
        while len(answered) < len(requests):
            event = await device.receive()
            assert isinstance(event, InferResult), event
            answered.add(event.task_id)
    await closing
    assert answered == {r.task_id for r in requests}
    late = device.request(b"x", model_id=served.model_id, cut=CUT, codec="float32")
    with contextlib.suppress(SecureCIError):
        await device.send(late)
        event = await device.receive()
        assert isinstance(event, Error)
        assert event.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.BAD_TENSOR)
    await device.aclose()


@pytest.mark.parametrize(
    "served",
    [EdgeLimits(max_wait_ms=1.0, signing_workers=1, request_timeout=2.0)],
    indirect=True,
    ids=["process"],
)
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dead", "hung"])
async def test_a_failed_signing_process_falls_back_to_inline_signing(
    served: Served, fault: signal.Signals
) -> None:
    device = await _device(served)
    await device.handshake()

    async def four() -> None:  # in flight together: all but a first are not lone (see _service)
        requests = [_request(served, device) for _ in range(4)]
        for request in requests:
            await device.send(request)
        for _ in requests:
            assert isinstance(await device.receive(), InferResult)

    await four()
    worker = served.edge._signing._workers[0].process
    os.kill(worker.pid, fault)
    for _ in range(2):
        await four()
    assert served.edge.stats["signing_fallbacks"] == 1
    _assert_signed_by_the_enclave(served, 12)
    await device.aclose()


@pytest.mark.parametrize(
    "served", [EdgeLimits(signing_workers=1, request_timeout=2.0)], indirect=True, ids=["process"]
)
async def test_a_lone_request_is_signed_without_the_signing_process(served: Served) -> None:
    # One request with nothing else in flight skips the round trip to the signing process:
    # a stopped process neither delays it nor triggers the fallback.
    device = await _device(served)
    await device.handshake()
    worker = served.edge._signing._workers[0].process
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            await device.send(_request(served, device))
            assert isinstance(await device.receive(), InferResult)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert served.edge.stats["signing_fallbacks"] == 0
    _assert_signed_by_the_enclave(served, 3)
    await device.aclose()


def _request(served: Served, device: RawDevice) -> InferRequest:
    x = _features(served, torch.randn(1, 1, 32, 32))
    return device.request(x, model_id=served.model_id, cut=CUT, codec="float32")


def _assert_signed_by_the_enclave(served: Served, count: int) -> None:
    entries = served.journal.entries
    assert len(entries) == count
    for entry in entries:
        signer = entry.result.recover(entry.edge_sig, served.edge.domain)
        assert signer == served.edge.identity.address


async def test_a_port_in_use_is_a_channel_error_and_leaves_nothing_running() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        enclave = dev_enclave(DEV_NOW)
        config = EdgeConfig(port=taken.getsockname()[1], limits=EdgeLimits(signing_workers=1))
        with pytest.raises(ChannelError, match="cannot listen"):
            async with open_edge(
                config, provider=enclave.provider, models=registry(), clock=lambda: float(DEV_NOW)
            ):
                pass
    finally:
        taken.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("secure-ci-")]


async def test_a_version_1_device_is_refused_at_the_hello(served: Served) -> None:
    """v1 requests lack prev_request: the edge says so instead of failing every request."""
    device = await _device(served)
    await device.send(Hello(versions=(1,), device="0x" + device.address.hex()))
    refusal = await device.receive()
    assert isinstance(refusal, Error)
    assert refusal.code == ErrorCode.UNSUPPORTED_VERSION
    await device.aclose()
