"""Where a secure request's time goes: each part measured alone, in microseconds per request.

The parts are what one request and its answer cost on the secure path, timed in this process
on the setup's own payload and output: TLS 1.3 (both ends, both directions: what an asyncio
TLS connection adds to a TCP one over loopback), framing and CBOR (both ends), the edge's
request check (record hash, input commitment, signature recovery; it runs beside the tail),
the result record (output commitment, hash, signature; ``output_commitment`` is its first
part alone: the canonical output under the model's rule and the opened commitment), a
journal group commit with fsync (SQLite on this machine's disk; alone and shared by a full
batch), and one event loop -> worker thread -> event loop hand-off. ``in_baseline`` marks
the parts the plaintext edge pays too; the others are the security overhead. Device-side
record work (signing a request, checking a result) is listed apart: the benchmark's devices
prepare requests before the clock starts and do not check results, as it measures the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secure_ci.channel import server_context
from secure_ci.device import DeviceIdentity, EnclaveBinding, sign_request, verify_result
from secure_ci.edge import TailEntry, create_identity
from secure_ci.ledger._canonical import open_output
from secure_ci.ledger._journal import Journal, JournalEntry
from secure_ci.ledger._records import LedgerDomain, TaskRequest, TaskResult, commitment
from secure_ci.partition import canonical_bytes
from secure_ci.protocol import InferResult, Limits, decode_event, encode_event, encode_frame
from secure_ci.protocol._frames import FrameBuffer
from secure_ci.testing import DEV_NOW, DevEnclave

DOMAIN = LedgerDomain(0, bytes(20))


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _tls_contexts(enclave: DevEnclave) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    identity = create_identity(enclave.provider, now=DEV_NOW)
    server = server_context(
        identity.credentials.cert_pem.encode(), identity.credentials.key_pem.encode()
    )
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


async def _tls_us(enclave: DevEnclave, request: int, answer: int, repeats: int) -> float:
    """What TLS adds to a round trip of ``request`` then ``answer`` bytes over loopback, both
    ends in this thread (so the difference is CPU: record protection and asyncio's TLS
    transport), TCP and TLS echo connections taking turns."""
    server_ctx, client_ctx = _tls_contexts(enclave)
    reply = bytes(answer)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readexactly(request)
                writer.write(reply)
                await writer.drain()
        writer.close()

    times: dict[bool, list[float]] = {False: [], True: []}
    servers = {
        tls: await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx if tls else None)
        for tls in (False, True)
    }
    try:
        ends = {
            tls: await asyncio.open_connection(
                "127.0.0.1",
                servers[tls].sockets[0].getsockname()[1],
                ssl=client_ctx if tls else None,
            )
            for tls in (False, True)
        }
        data = bytes(request)
        for _ in range(max(2, repeats // 10)):
            for tls, (reader, writer) in ends.items():
                for _ in range(10):
                    start = time.perf_counter()
                    writer.write(data)
                    await writer.drain()
                    await reader.readexactly(answer)
                    times[tls].append(time.perf_counter() - start)
        for _, writer in ends.values():
            writer.close()
    finally:
        for server in servers.values():
            server.close()
            await server.wait_closed()
    return (statistics.median(times[True]) - statistics.median(times[False])) * 1e6


async def breakdown(
    enclave: DevEnclave, tail: TailEntry, payload: bytes, output: bytes, repeats: int
) -> dict[str, Any]:
    """Microseconds per request of each part of the secure path (see the module docstring)."""
    device = DeviceIdentity.generate()
    edge = create_identity(enclave.provider, now=DEV_NOW)
    binding = EnclaveBinding(edge.address, edge.measurement, edge.quote_id)

    def signed() -> tuple[Any, TaskRequest]:
        return sign_request(
            device, enclave=binding, domain=DOMAIN, model_id=tail.model_id, cut=tail.cut,
            codec="int8", device_seq=1, deadline=0, salt=os.urandom(32), payload=payload,
        )  # fmt: skip

    request, record = signed()

    def check() -> None:  # what check_request does besides decoding (the baseline decodes too)
        rebuilt = TaskRequest(
            task_id=request.task_id, device=device.address, device_seq=request.device_seq,
            model_id=request.model_id, cut=request.cut,
            input_commitment=commitment(request.salt, request.payload), edge=edge.address,
            deadline=request.deadline, prev_request=request.prev_request,
        )  # fmt: skip
        rebuilt.recover(request.signature, DOMAIN)

    salt = os.urandom(32)

    def output_commitment() -> bytes:  # the canonical output, its digests and the commitment
        opening = open_output(salt, request.salt, canonical_bytes(tail.canonical, output), output)
        return opening.commitment()

    def result_record() -> tuple[TaskResult, bytes, bytes]:
        result = TaskResult(
            task_id=record.task_id, request_hash=record.struct_hash(),
            output_commitment=output_commitment(), measurement=edge.measurement,
            quote_id=edge.quote_id, status=0, latency_ms=1, edge_seq=0,
        )  # fmt: skip
        digest = result.digest(DOMAIN)
        from secure_ci.ledger._records import sign_digest

        return result, digest, sign_digest(edge.signing_key, digest)

    result, digest, signature = result_record()
    answer = InferResult(record.task_id, 0, output, salt, 0, 1, signature)
    limits = Limits(max_frame_bytes=64 << 20, max_payload_bytes=63 << 20)
    request_frame = encode_frame(*encode_event(request), limits)
    answer_frame = encode_frame(*encode_event(answer), limits)

    request_parts, answer_parts = encode_event(request), encode_event(answer)

    def framing() -> None:  # both ends: length prefix and header/payload split
        for (header, body), frame in ((request_parts, request_frame), (answer_parts, answer_frame)):
            encode_frame(header, body, limits)
            FrameBuffer(limits).feed(frame)

    def cbor() -> None:  # both ends: the event header to CBOR and back
        for event, (header, body) in ((request, request_parts), (answer, answer_parts)):
            encode_event(event)
            decode_event(header, body)

    costs: dict[str, dict[str, Any]] = {
        "tls": {
            "us": await _tls_us(enclave, len(request_frame), len(answer_frame), repeats),
            "in_baseline": False,
        },
        "framing": {"us": _median_us(framing, repeats), "in_baseline": True},
        "cbor": {"us": _median_us(cbor, repeats), "in_baseline": True},
        # checked in a checker thread while the tail runs: off a lone request's critical path
        "signature_verify": {
            "us": _median_us(check, repeats),
            "in_baseline": False,
            "beside_tail": True,
        },
        "signature_sign": {"us": _median_us(result_record, repeats), "in_baseline": False},
    }
    with tempfile.TemporaryDirectory(prefix="secure-ci-bench-") as state:
        journal = Journal.open(Path(state) / "journal.sqlite", edge=edge.address)
        try:
            made = iter(range(1 << 30))

            def entries(count: int) -> list[JournalEntry]:  # fresh task ids, next sequence
                out = []
                for _ in range(count):
                    n = next(made)
                    task = n.to_bytes(32, "big")
                    out.append(
                        JournalEntry(
                            dataclasses.replace(record, task_id=task, device_seq=n + 1),
                            dataclasses.replace(result, task_id=task, edge_seq=n),
                            request.signature,
                            signature,
                            digest,
                        )
                    )
                return out

            fsync_one = _median_commit_us(journal, [entries(1) for _ in range(30)])
            fsync_batch = _median_commit_us(journal, [entries(32) for _ in range(10)]) / 32
        finally:
            journal.close()
    costs["journal_fsync"] = {"us": fsync_one, "per_request_in_batch_of_32_us": fsync_batch,
                              "in_baseline": False}  # fmt: skip
    costs["thread_handoff"] = {"us": await _handoff_us(repeats), "in_baseline": True}
    costs["device_sign_request"] = {"us": _median_us(signed, repeats), "in_round_trip": False}
    costs["output_commitment"] = {"us": _median_us(output_commitment, repeats),
                                  "in_baseline": False}  # fmt: skip
    costs["device_verify_result"] = {
        "us": _median_us(
            lambda: verify_result(
                answer, request, record, enclave=binding, domain=DOMAIN, canonical=tail.canonical
            ),
            repeats,
        ),
        "in_round_trip": False,
    }
    return costs


def _median_commit_us(journal: Journal, groups: list[list[JournalEntry]]) -> float:
    """Median time of one ``append_many`` (a group commit, fsync included) per group."""
    times = []
    for group in groups:
        start = time.perf_counter()
        journal.append_many(group)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e6


async def _handoff_us(repeats: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        await loop.run_in_executor(pool, int)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            await loop.run_in_executor(pool, int)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6
