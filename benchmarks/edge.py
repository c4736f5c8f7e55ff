"""Edge benchmark: security overhead, cross-device batching, attested handshake time.

Each edge runs in its own process on loopback (the devices share one client process), with
the zoo's ResNet-18 split a quarter of the way in (most compute in the enclave's tail) and
int8 features, so the figures are ratios measured in the same run on the same machine:

* ``overhead``: a plaintext TCP edge with the same framing, batcher, model and cut but no TLS,
  no request/result signatures and no journal, against the real edge (attested TLS 1.3,
  device-signed requests, enclave-signed results, in-memory journal). ``latency_ratio`` is the
  median sequential round trip (secure / plain); ``throughput_ratio`` is requests/s with 8
  pipelining devices (secure / plain).
* ``batching``: requests/s of 1, 8 and 32 closed-loop devices on the real edge, divided by the
  tail's offline throughput on full batches (``max_batch`` rows per call) measured here too.
* ``handshake_ms``: TLS 1.3 connect + RA-TLS evidence verification + Hello/Authenticate.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from secure_ci.channel import FramedStream
from secure_ci.edge import (
    Batcher,
    BatchLimits,
    EdgeConfig,
    EdgeLimits,
    ModelRegistry,
    TailEntry,
    open_edge,
    tails_from_partitioner,
)
from secure_ci.ledger._records import address_of, keccak256
from secure_ci.partition import Partitioner, encode_features
from secure_ci.protocol import (
    PROTOCOL_VERSIONS,
    Authenticate,
    AuthOk,
    Close,
    Connection,
    Hello,
    HelloAck,
    InferRequest,
    InferResult,
    Role,
)
from secure_ci.testing import (
    DEV_NOW,
    DevEnclave,
    RawDevice,
    dev_pki,
    dev_policy,
    dev_provider,
)
from secure_ci.zoo import get, resnet18

MODEL = "resnet18"
WIDTH = 64
"""The classic ResNet-18 width: the security and batching overheads are per request, so they
are measured against a tail of realistic cost (the zoo's default width 16 is a test size)."""
CODEC = "int8"
MAX_BATCH = 32
EDGE_LIMITS = EdgeLimits(max_batch=MAX_BATCH, max_wait_ms=1.0, max_inflight_per_device=64)
BATCH_LIMITS = BatchLimits(max_batch=MAX_BATCH, max_wait=0.001, max_queue=EDGE_LIMITS.max_queue)


def _tail() -> tuple[TailEntry, torch.nn.Module, tuple[int, ...]]:
    entry = get(MODEL)
    torch.manual_seed(0)
    model = resnet18(width=WIDTH)
    partitioner = Partitioner(model, (torch.zeros(entry.input_shape),))
    cut = len(partitioner.cuts) // 4
    head, _ = partitioner.split(cut)
    (tail,) = tails_from_partitioner(partitioner, [cut], [CODEC])
    return tail, head, entry.input_shape


# -- plaintext baseline ----------------------------------------------------------------------


async def _plain_server(tail: TailEntry, limits: BatchLimits) -> tuple[asyncio.Server, Any]:
    """Same framing, state machine, batcher and tail; no TLS, no signatures, no journal."""

    def run(batch: Any) -> list[bytes]:
        return tail.run_batch(batch)

    batcher: Batcher[Any, bytes] = Batcher(run, limits=limits)
    await batcher.__aenter__()

    async def answer(stream: FramedStream, request: InferRequest) -> None:
        output = await batcher.submit(tail.decode(request.codec, request.payload))
        await stream.send(InferResult(request.task_id, 0, output, bytes(32), 0, 0, bytes(65)))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, Connection(Role.EDGE, now=time.monotonic()))
        tasks: set[asyncio.Task[None]] = set()
        try:
            hello = await stream.next_event()
            assert isinstance(hello, Hello)
            await stream.send(HelloAck(1, bytes(16), bytes(32), hello.device, {}))
            await stream.next_event()
            await stream.send(AuthOk())
            while True:
                event = await stream.next_event()
                if not isinstance(event, InferRequest):
                    break
                task = asyncio.create_task(answer(stream, event))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks))
            await stream.send(Close())
        except Exception:
            pass
        finally:
            await stream.aclose()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, batcher


class _PlainDevice:
    def __init__(self, stream: FramedStream, cut: int) -> None:
        self.stream = stream
        self.cut = cut
        self._seq = 0

    @classmethod
    async def connect(cls, port: int, cut: int) -> _PlainDevice:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = FramedStream(reader, writer, Connection(Role.DEVICE, now=time.monotonic()))
        device = "0x" + "11" * 20
        await stream.send(Hello(versions=PROTOCOL_VERSIONS, device=device))
        await stream.next_event()
        await stream.send(Authenticate(signature=bytes(65)))
        await stream.next_event()
        return cls(stream, cut)

    def request(self, payload: bytes, model_id: bytes) -> InferRequest:
        self._seq += 1
        return InferRequest(
            os.urandom(32), model_id, self.cut, CODEC, self._seq, 0, bytes(32), payload, bytes(65)
        )


# -- measurement -----------------------------------------------------------------------------


async def _round_trips(device: Any, make: Callable[[], InferRequest], count: int) -> list[float]:
    times = []
    for _ in range(count):
        request = make()
        start = time.perf_counter()
        await device.stream.send(request)
        event = await device.stream.next_event()
        times.append(time.perf_counter() - start)
        if not isinstance(event, InferResult):
            raise RuntimeError(f"unexpected {event!r}")
    return times


async def _closed_loop(
    devices: list[Any], make: Callable[[Any], InferRequest], per: int, depth: int
) -> float:
    """Requests/s with each device keeping ``depth`` requests in flight for ``per`` requests.

    Requests are made (and signed) before the clock starts: that is device work, done on the
    devices' own hardware in a deployment, while this measures the edge.
    """
    prepared = {id(d): [make(d) for _ in range(per)] for d in devices}

    async def drive(device: Any) -> None:
        queue = iter(prepared[id(device)])
        sent = received = 0
        while sent < min(depth, per):
            await device.stream.send(next(queue))
            sent += 1
        while received < per:
            event = await device.stream.next_event()
            if not isinstance(event, InferResult):
                raise RuntimeError(f"unexpected {event!r}")
            received += 1
            if sent < per:
                await device.stream.send(next(queue))
                sent += 1

    start = time.perf_counter()
    await asyncio.gather(*(drive(d) for d in devices))
    return len(devices) * per / (time.perf_counter() - start)


def _offline_throughput(tail: TailEntry, sample: tuple[torch.Tensor, ...], seconds: float) -> float:
    batch = [sample] * MAX_BATCH
    tail.run_batch(batch)
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tail.run_batch(batch)
        rows += MAX_BATCH
    return rows / (time.perf_counter() - start)


PKI_SEED = 7
"""Parent and edge child derive the same dev PKI from this seed (no files to exchange)."""


def _enclave() -> DevEnclave:
    pki = dev_pki(DEV_NOW, seed=PKI_SEED)
    provider = dev_provider(pki)
    return DevEnclave(pki, provider, dev_policy(pki), pki.collateral)


def _keys() -> list[bytes]:
    return [keccak256(b"bench-device-%d" % i) for i in range(32)]


async def _serve_child(kind: str) -> None:
    """Child process: serve one edge until stdin closes; print the port first."""
    torch.set_num_threads(1)
    tail, _, _ = _tail()
    if kind == "plain":
        server, batcher = await _plain_server(tail, BATCH_LIMITS)
        print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        server.close()
        await batcher.drain()
        return
    config = EdgeConfig(
        limits=EDGE_LIMITS, allowed_devices=frozenset(address_of(k) for k in _keys())
    )
    models = ModelRegistry()
    models.add(tail)
    enclave = _enclave()
    async with open_edge(
        config, provider=enclave.provider, models=models, clock=lambda: float(DEV_NOW)
    ) as edge:
        print(f"port {edge.port}", flush=True)
        await asyncio.to_thread(sys.stdin.read)


def _spawn(kind: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("port "):
        proc.kill()
        raise RuntimeError(f"{kind} edge did not start: {line!r}")
    return proc, int(line.split()[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def _bench(quick: bool, plain_port: int, secure_port: int) -> dict[str, Any]:
    tail, head, input_shape = _tail()
    x = torch.randn(input_shape)
    with torch.inference_mode():
        boundary = head(x)
    payload = encode_features(boundary, CODEC)
    sample = tail.decode(CODEC, payload)
    rounds = 40 if quick else 200
    enclave = _enclave()
    keys = _keys()
    now = lambda: float(DEV_NOW)  # noqa: E731
    result: dict[str, Any] = {}

    async def secure(key: bytes) -> RawDevice:
        device = await RawDevice.connect(secure_port, enclave=enclave, key=key, now_fn=now)
        await device.handshake()
        return device

    def secure_request(device: Any) -> InferRequest:
        return device.request(payload, model_id=tail.model_id, cut=tail.cut, codec=CODEC)

    def plain_request(device: Any) -> InferRequest:
        return device.request(payload, tail.model_id)

    handshakes = []
    for i in range(20 if quick else 100):
        start = time.perf_counter()
        device = await secure(keys[i % len(keys)])
        handshakes.append((time.perf_counter() - start) * 1000)
        await device.aclose()
    result["handshake_ms"] = {
        "p50": statistics.median(handshakes),
        "p95": statistics.quantiles(handshakes, n=20)[18],
    }

    secure_one = await secure(keys[0])
    plain_one = await _PlainDevice.connect(plain_port, tail.cut)
    lat_s: list[float] = []
    lat_p: list[float] = []
    for _ in range(rounds // 5):  # alternate in small chunks: the load drifts, not the code
        lat_p += await _round_trips(plain_one, lambda: plain_request(plain_one), 5)
        lat_s += await _round_trips(secure_one, lambda: secure_request(secure_one), 5)
    await secure_one.aclose()
    await plain_one.stream.aclose()
    secure8 = [await secure(k) for k in keys[:8]]
    plain8 = [await _PlainDevice.connect(plain_port, tail.cut) for _ in range(8)]
    per = 8 if quick else 30
    tput_p_runs, tput_s_runs = [], []
    for _ in range(3 if quick else 6):
        tput_p_runs.append(await _closed_loop(plain8, plain_request, per, depth=4))
        tput_s_runs.append(await _closed_loop(secure8, secure_request, per, depth=4))
    tput_p, tput_s = statistics.median(tput_p_runs), statistics.median(tput_s_runs)
    for d in secure8:
        await d.aclose()
    for p in plain8:
        await p.stream.aclose()
    result["overhead"] = {
        "latency_ms_plain": statistics.median(lat_p) * 1000,
        "latency_ms_secure": statistics.median(lat_s) * 1000,
        "latency_ratio": statistics.median(lat_s) / statistics.median(lat_p),
        "throughput_plain": tput_p,
        "throughput_secure": tput_s,
        "throughput_ratio": tput_s / tput_p,
    }

    batching = []
    offline_runs = []
    for n in (1, 8, 32):
        devices = [await secure(k) for k in keys[:n]]
        per = max(8, (96 if quick else 480) // n)
        offline = _offline_throughput(tail, sample, 1.0 if quick else 3.0)  # same load now
        offline_runs.append(offline)
        rate = await _closed_loop(devices, secure_request, per, depth=2)
        batching.append({"devices": n, "requests_per_s": rate, "ratio_to_offline": rate / offline})
        for d in devices:
            await d.aclose()
    result["batching"] = batching
    result["offline_rows_per_s"] = statistics.median(offline_runs)
    result["setup"] = {
        "model": MODEL, "width": WIDTH, "cut": tail.cut, "codec": CODEC, "max_batch": MAX_BATCH
    }  # fmt: skip
    return result


def run(*, quick: bool) -> dict[str, Any]:
    """Run the edge benchmark (see the module docstring)."""
    torch.set_num_threads(1)
    plain, plain_port = _spawn("plain")
    try:
        secure, secure_port = _spawn("secure")
        try:
            return asyncio.run(_bench(quick, plain_port, secure_port))
        finally:
            _stop(secure)
    finally:
        _stop(plain)


if __name__ == "__main__":
    asyncio.run(_serve_child(sys.argv[1]))
