"""Edge benchmark parts: the setups, the plaintext baseline, and the edge child processes.

Each edge runs in its own process (``python _edge_servers.py KIND SETUP``), printing its port
and serving until its stdin closes. ``plain`` is the baseline: the same framing, protocol
state machine, opportunistic batcher, worker thread, model and cut, with no TLS, no request or
result signatures and no journal. ``secure`` is the real edge (attested TLS 1.3, device-signed
requests checked, enclave-signed results) with the write-ahead journal in memory; ``durable``
is the same with the SQLite journal on disk (fsync before every answer).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    TailWorker,
    open_edge,
    tails_from_partitioner,
)
from secure_ci.ledger._records import address_of, keccak256
from secure_ci.partition import Partitioner
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
from secure_ci.testing import DEV_NOW, DevEnclave, dev_pki, dev_policy, dev_provider

MAX_BATCH = 32
EDGE_LIMITS = EdgeLimits(max_batch=MAX_BATCH, max_wait_ms=2.0, max_inflight_per_device=64)
BATCH_LIMITS = BatchLimits(max_batch=MAX_BATCH, max_wait=0.002, max_queue=EDGE_LIMITS.max_queue)
PKI_SEED = 7
"""Parent and edge child derive the same dev PKI from this seed (no files to exchange)."""
DEVICES = 32


@dataclass(frozen=True)
class Setup:
    """A model split ``cut_fraction`` of the way in, its features sent with ``codec``."""

    name: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    cut_fraction: float = 0.25
    codec: str = "int8"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, **self.options, "codec": self.codec}


SETUPS = (
    # The classic ResNet-18 width: the zoo's default width 16 is a test size.
    Setup("tail_20ms", "resnet18", {"width": 64}),
    Setup("tail_1ms", "transformer_encoder"),
)


def build_tail(setup: Setup) -> tuple[TailEntry, torch.nn.Module, tuple[int, ...]]:
    """The setup's tail (as the edge serves it), its head and the model's input shape."""
    from secure_ci import zoo

    entry = zoo.get(setup.model)
    torch.manual_seed(0)
    model = getattr(zoo, setup.model)(**setup.options) if setup.options else entry.build()
    partitioner = Partitioner(model, (torch.zeros(entry.input_shape),))
    cut = int(len(partitioner.cuts) * setup.cut_fraction)
    head, _ = partitioner.split(cut)
    (tail,) = tails_from_partitioner(partitioner, [cut], [setup.codec])
    return tail, head, entry.input_shape


def device_keys() -> list[bytes]:
    return [keccak256(b"bench-device-%d" % i) for i in range(DEVICES)]


def bench_enclave() -> DevEnclave:
    pki = dev_pki(DEV_NOW, seed=PKI_SEED)
    return DevEnclave(pki, dev_provider(pki), dev_policy(pki), pki.collateral)


# -- plaintext baseline ----------------------------------------------------------------------


async def plain_server(tail: TailEntry) -> tuple[asyncio.Server, Batcher[Any, bytes]]:
    """Same framing, state machine, batcher, worker and tail; no TLS, signatures or journal."""
    limits = BATCH_LIMITS if tail.batchable else BatchLimits(1, 0.0, BATCH_LIMITS.max_queue)
    worker = TailWorker(ThreadPoolExecutor(1, thread_name_prefix="plain-tail"))  # as the edge
    batcher: Batcher[Any, bytes] = Batcher(tail.run_batch, limits=limits, worker=worker)
    await batcher.__aenter__()

    async def answer(stream: FramedStream, request: InferRequest) -> None:
        output = await batcher.submit(tail.decode(request.codec, request.payload))
        await stream.send(InferResult(request.task_id, 0, output, bytes(32), 0, 0, bytes(65)))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, Connection(Role.EDGE, now=time.monotonic()))
        tasks: set[asyncio.Task[None]] = set()
        try:
            hello = await stream.next_event()
            if not isinstance(hello, Hello):
                return
            version = max(set(hello.versions) & set(PROTOCOL_VERSIONS))
            await stream.send(HelloAck(version, bytes(16), bytes(32), hello.device, {}))
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
        except Exception as exc:  # a benchmark server: report, never hang the run
            print(f"plain session failed: {exc!r}", file=sys.stderr)
        finally:
            await stream.aclose()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, batcher


class PlainDevice:
    """The device side of the baseline: the same frames, dummy signatures."""

    def __init__(self, stream: FramedStream, tail: TailEntry, codec: str) -> None:
        self.stream = stream
        self.tail = tail
        self.codec = codec
        self._seq = 0

    @classmethod
    async def connect(cls, port: int, tail: TailEntry, codec: str) -> PlainDevice:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = FramedStream(reader, writer, Connection(Role.DEVICE, now=time.monotonic()))
        await stream.send(Hello(versions=PROTOCOL_VERSIONS, device="0x" + "11" * 20))
        ack = await stream.next_event()
        if not isinstance(ack, HelloAck):
            raise RuntimeError(f"plain edge refused: {ack!r}")
        await stream.send(Authenticate(signature=bytes(65)))
        await stream.next_event()
        return cls(stream, tail, codec)

    def request(self, payload: bytes) -> InferRequest:
        self._seq += 1
        return InferRequest(
            os.urandom(32),
            self.tail.model_id,
            self.tail.cut,
            self.codec,
            self._seq,
            0,
            bytes(32),
            payload,
            bytes(65),
        )

    async def aclose(self) -> None:
        await self.stream.send(Close())
        await self.stream.next_event()  # the edge's Close
        await self.stream.aclose()


# -- edge child processes --------------------------------------------------------------------


async def serve_child(kind: str, setup_name: str) -> None:
    """Child process: serve one edge until stdin closes; print the port first."""
    torch.set_num_threads(1)
    setup = next(s for s in SETUPS if s.name == setup_name)
    tail, _, _ = build_tail(setup)
    if kind == "plain":
        server, batcher = await plain_server(tail)
        print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        server.close()
        await batcher.drain()
        return
    config = EdgeConfig(
        limits=EDGE_LIMITS, allowed_devices=frozenset(address_of(k) for k in device_keys())
    )
    models = ModelRegistry()
    models.add(tail)
    enclave = bench_enclave()
    with tempfile.TemporaryDirectory(prefix="secure-ci-bench-") as state:
        journal: Any = None
        if kind == "durable":
            from secure_ci.edge import create_identity
            from secure_ci.ledger._journal import Journal

            identity = create_identity(enclave.provider, now=DEV_NOW)
            journal = Journal.open(Path(state) / "journal.sqlite", edge=identity.address)
        else:
            identity = None
        async with open_edge(
            config,
            provider=enclave.provider,
            models=models,
            journal=journal,
            identity=identity,
            clock=lambda: float(DEV_NOW),
        ) as edge:
            print(f"port {edge.port}", flush=True)
            await asyncio.to_thread(sys.stdin.read)
        if journal is not None:
            journal.close()


def spawn(kind: str, setup: Setup) -> subprocess.Popen[str]:
    """Start an edge child (read its port with :func:`port_of`)."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), kind, setup.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def port_of(proc: subprocess.Popen[str]) -> int:
    """The port the edge child listens on, once it serves."""
    line = proc.stdout.readline() if proc.stdout is not None else ""
    if not line.startswith("port "):
        raise RuntimeError(f"edge child {proc.args!r} did not start: {line!r}")
    return int(line.split()[1])


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


if __name__ == "__main__":
    asyncio.run(serve_child(sys.argv[1], sys.argv[2]))
