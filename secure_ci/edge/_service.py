"""The edge service: an asyncio TLS 1.3 server whose sessions share per-tail batchers.

``open_edge`` is the owner of everything: the listening socket, the sessions (tracked, so
shutdown can drain and then close them), one :class:`Batcher` per (model, cut) and the single
worker thread that runs tails, signs results and appends them to the journal in one group
commit per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Container, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from secure_ci.attestation import EvidenceProvider
from secure_ci.channel import server_context
from secure_ci.edge._batcher import Batcher, BatchLimits, TailWorker
from secure_ci.edge._config import EdgeConfig
from secure_ci.edge._identity import EnclaveIdentity, MemoryJournal, RecordSink, create_identity
from secure_ci.edge._models import ModelRegistry, TailEntry
from secure_ci.edge._requests import INLINE_DECODE_BYTES, Job, verify_request
from secure_ci.edge._session import serve_session
from secure_ci.exceptions import ChannelError, ConfigError, LedgerError, ProtocolError
from secure_ci.ledger._canonical import open_output
from secure_ci.ledger._journal import JournalEntry
from secure_ci.ledger._records import LedgerDomain, Signer, TaskRequest, TaskResult
from secure_ci.ledger._signing import SigningPool
from secure_ci.partition._canonical import DEFAULT_CANONICAL, CanonicalRule, canonical_bytes
from secure_ci.protocol import ErrorCode, InferRequest, InferResult, Limits

__all__ = ["EdgeService", "open_edge"]

log = logging.getLogger(__name__)

RECENT_PER_DEVICE = 4096
"""Task ids remembered per device across sessions, to refuse replays on a new connection."""


class EdgeService:
    """A running edge (use :func:`open_edge`). ``port`` is the bound TCP port."""

    def __init__(
        self,
        config: EdgeConfig,
        *,
        provider: EvidenceProvider,
        identity: EnclaveIdentity,
        models: ModelRegistry,
        allowed_devices: Container[bytes],
        journal: RecordSink,
        clock: Callable[[], float],
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self.config = config
        self.provider = provider
        self.identity = identity
        self.models = models
        self.allowed_devices = allowed_devices
        self.journal = journal
        self.domain = LedgerDomain(config.chain_id, config.contract)
        self.stats: Counter[str] = Counter()
        self.port = 0
        self.closing = False
        limits = config.limits
        self.protocol_limits = Limits(
            max_frame_bytes=limits.max_frame_bytes,
            max_payload_bytes=limits.max_frame_bytes - 8192,
            max_in_flight=limits.max_inflight_per_device,
            handshake_timeout=limits.handshake_timeout,
            idle_timeout=limits.idle_timeout,
        )
        self._clock = clock
        self.random_bytes = random_bytes
        self._sessions = 0
        self._inflight: Counter[bytes] = Counter()
        self._recent: dict[bytes, OrderedDict[bytes, None]] = {}
        self._seed_replay_memory()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="secure-ci-tail")
        # Result records are signed inline (workers=0) or in worker processes, which keeps the
        # signatures off a GIL the event loop is busy with (see secure_ci.ledger._signing).
        self._signing = SigningPool(identity.signing_key, workers=limits.signing_workers)
        # ...except a lone request's (nothing else in flight): its one signature costs less in
        # the worker, whose GIL the idle loop leaves alone, than the round trip to a process.
        self._lone_signer = Signer(identity.signing_key)
        self._checkers = ThreadPoolExecutor(2, thread_name_prefix="secure-ci-check")
        batch_limits = BatchLimits(
            max_batch=limits.max_batch,
            max_wait=limits.max_wait_ms / 1000.0,
            max_queue=limits.max_queue,
        )
        # The tail runs, then its results are signed and group-committed to the journal, in the
        # one worker thread: a result is answered only once journaled, with no extra hand-off.
        # Every tail's batcher shares that worker: each dispatches at once when it is idle.
        self._worker = TailWorker(self._executor)
        # A tail that cannot batch (see TailEntry) gets batches of one.
        alone = dataclasses.replace(batch_limits, max_batch=1)
        self._batchers: dict[tuple[bytes, int], Batcher[Job, InferResult | ProtocolError]] = {
            (e.model_id, e.cut): Batcher(
                self._tail_runner(e),
                limits=batch_limits if e.batchable else alone,
                worker=self._worker,
            )
            for e in models.entries()
        }

    # -- sessions ---------------------------------------------------------------------------

    def admit_session(self) -> bool:
        if self.closing or self._sessions >= self.config.limits.max_sessions:
            return False
        self._sessions += 1
        self.stats["sessions"] += 1
        return True

    def release_session(self) -> None:
        self._sessions -= 1

    @property
    def active_sessions(self) -> int:
        return self._sessions

    @property
    def in_flight(self) -> int:
        return sum(self._inflight.values())

    # -- requests ---------------------------------------------------------------------------

    def _seed_replay_memory(self) -> None:
        """After a restart, remember the task ids the journal answered whose deadline has not
        passed: a request replayed to the restarted edge is refused as before the restart
        (older ones are refused by their deadline)."""
        recent = getattr(self.journal, "recent_requests", None)
        if recent is None:
            return
        now = self._clock()
        for device, task_id, deadline in reversed(recent(RECENT_PER_DEVICE * 16)):
            if deadline >= now:
                memory = self._recent.setdefault(device, OrderedDict())
                memory[task_id] = None
                if len(memory) > RECENT_PER_DEVICE:
                    memory.popitem(last=False)

    def _remember(self, device: bytes, task_id: bytes) -> None:
        recent = self._recent.setdefault(device, OrderedDict())
        if task_id in recent:
            raise ProtocolError("replayed task id", code=ErrorCode.REPLAY)
        recent[task_id] = None
        if len(recent) > RECENT_PER_DEVICE:
            recent.popitem(last=False)

    async def run_request(
        self, device: bytes, request: InferRequest, received_at: float
    ) -> InferResult:
        """Check, batch, run, sign and journal one request; raises ProtocolError to refuse."""
        if self.closing:
            raise ProtocolError("the edge is shutting down", code=ErrorCode.SHUTTING_DOWN)
        if self._inflight[device] >= self.config.limits.max_inflight_per_device:
            raise ProtocolError("too many requests in flight for this device", code=ErrorCode.BUSY)
        self._inflight[device] += 1
        self._idle.clear()
        try:
            result = await self._run_checked(device, request, received_at)
        except TimeoutError:
            raise ProtocolError("the edge did not finish in time", code=ErrorCode.TIMEOUT) from None
        finally:
            self._inflight[device] -= 1
            if not self._inflight[device]:
                del self._inflight[device]
            if not self._inflight:
                self._idle.set()
        self.stats["results"] += 1
        return result

    async def _run_checked(
        self, device: bytes, request: InferRequest, received_at: float
    ) -> InferResult:
        tail = self.models.get(request.model_id, request.cut)
        now = self._clock()
        if request.deadline < now:  # a deadline of 0 is in the past: every task has one
            raise ProtocolError("request deadline has passed", code=ErrorCode.TIMEOUT)
        if request.deadline > now + self.config.limits.max_deadline_seconds:
            raise ProtocolError(
                f"request deadline is more than {self.config.limits.max_deadline_seconds:.0f} s"
                " away",
                code=ErrorCode.MALFORMED,
            )
        # See _requests: a lone small request is checked by the worker after its tail; other
        # requests' records are checked in checker threads beside the tail (the worker is then
        # kept for tails), and large payloads are decoded there too.
        small = len(request.payload) <= INLINE_DECODE_BYTES
        lone = len(self._inflight) == 1 and self._inflight[device] == 1
        check = None
        if not (small and lone):
            check = self._checkers.submit(
                verify_request,
                request,
                device=device,
                edge=self.identity.address,
                domain=self.domain,
            )
        if small:
            features = tail.decode(request.codec, request.payload)
        else:
            features = await asyncio.get_running_loop().run_in_executor(
                self._checkers, tail.decode, request.codec, request.payload
            )
        self._remember(device, request.task_id)
        batcher = self._batchers[(request.model_id, request.cut)]
        job = Job(request, device, check, features, received_at)
        async with asyncio.timeout(self.config.limits.request_timeout):
            outcome = await batcher.submit(job)
        if isinstance(outcome, ProtocolError):  # its record failed: the task id stays free
            self._recent[device].pop(request.task_id, None)
            raise outcome
        return outcome

    def _tail_runner(
        self, entry: TailEntry
    ) -> Callable[[Sequence[Job]], list[InferResult | ProtocolError]]:
        def run(jobs: Sequence[Job]) -> list[InferResult | ProtocolError]:
            started = time.monotonic()
            outputs = entry.run_batch([j.features for j in jobs])
            compute_us = _us(time.monotonic() - started)
            checked: list[tuple[Job, TaskRequest, bytes]] = []
            answers: list[InferResult | ProtocolError | None] = []
            for job, output in zip(jobs, outputs, strict=True):
                try:
                    checked.append((job, self._checked(job), output))
                    answers.append(None)
                except ProtocolError as exc:
                    answers.append(exc)
            lone = all(job.check is None for job in jobs)  # see _run_checked
            results = iter(
                self._sign_and_journal(checked, started, compute_us, entry.canonical, lone=lone)
            )
            return [next(results) if a is None else a for a in answers]

        return run

    def _checked(self, job: Job) -> TaskRequest:
        """The job's verified record: checked here, or by a checker thread (waited for)."""
        try:
            if job.check is None:
                return verify_request(
                    job.request, device=job.device, edge=self.identity.address, domain=self.domain
                )
            return job.check.result(timeout=self.config.limits.request_timeout)
        except ProtocolError:
            raise
        except Exception as exc:  # a bug or a hung check: refuse, never sign unchecked
            log.warning("request check failed: %r", exc)
            raise ProtocolError("internal error", code=ErrorCode.INTERNAL) from None

    def _sign_and_journal(
        self,
        done: Sequence[tuple[Job, TaskRequest, bytes]],
        started: float,
        compute_us: int,
        canonical: CanonicalRule = DEFAULT_CANONICAL,
        *,
        lone: bool = False,
    ) -> list[InferResult]:
        """Sign each result record and journal them in one group commit (worker thread);
        the batch ``started`` then (monotonic) and its tail took ``compute_us``. Each output
        commitment opens to the output's ``canonical`` digest and its payload digest, both
        bound to the request's salt (see :mod:`secure_ci.ledger._canonical`). A ``lone``
        request's result is signed right here."""
        if not done:
            return []
        finished = time.monotonic()
        seq = self.journal.next_seq  # only this thread appends
        salts = [self.random_bytes(32) for _ in done]
        records = []
        for offset, ((job, request, output), salt) in enumerate(zip(done, salts, strict=True)):
            latency_ms = min(max(0, int((finished - job.received_at) * 1000)), 2**32 - 1)
            records.append(
                TaskResult(
                    task_id=request.task_id,
                    request_hash=request.struct_hash(),
                    output_commitment=open_output(
                        salt, job.request.salt, canonical_bytes(canonical, output), output
                    ).commitment(),
                    measurement=self.identity.measurement,
                    quote_id=self.identity.quote_id,
                    status=0,
                    latency_ms=latency_ms,
                    edge_seq=seq + offset,
                )
            )
        digests = [record.digest(self.domain) for record in records]  # the record hashes
        signatures = self._sign(digests, lone=lone)
        self.journal.append_many(
            [
                JournalEntry(request, record, job.request.signature, signature, digest)
                for (job, request, _), record, signature, digest in zip(
                    done, records, signatures, digests, strict=True
                )
            ]
        )  # answered only once journaled
        return [
            InferResult(
                task_id=record.task_id,
                status=0,
                payload=output,
                salt=salt,
                edge_seq=record.edge_seq,
                latency_ms=record.latency_ms,
                signature=signature,
                queue_us=_us(started - job.received_at),
                compute_us=compute_us,
            )
            for (job, _, output), salt, record, signature in zip(
                done, salts, records, signatures, strict=True
            )
        ]

    def _sign(self, digests: list[bytes], *, lone: bool = False) -> list[bytes]:
        """Signatures of ``digests`` (a ``lone`` request's inline); a signing process that fails
        or hangs (no answer within half the ``request_timeout``) is replaced by inline signing:
        the edge keeps answering."""
        if lone:
            return [self._lone_signer.sign(d) for d in digests]
        try:
            # half the request's time: a fallback still answers within request_timeout
            return self._signing.submit(digests).result(self.config.limits.request_timeout / 2)
        except (LedgerError, TimeoutError) as exc:
            log.warning("signing workers failed (%r); signing inline from now on", exc)
            self.stats["signing_fallbacks"] += 1
            broken, self._signing = self._signing, SigningPool(self.identity.signing_key, workers=0)
            broken.close(grace_seconds=0.0)  # given up on: no grace
            return self._signing.submit(digests).result()

    async def _start(self) -> None:
        await asyncio.to_thread(self._signing.start)  # worker processes import first (~1 s)
        for batcher in self._batchers.values():
            await batcher.__aenter__()

    # -- lifetime ---------------------------------------------------------------------------

    async def _drain(self, sessions: set[asyncio.Task[None]]) -> None:
        """Refuse new work, wait (bounded) for in-flight tasks, then end the sessions."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.limits.drain_timeout
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._idle.wait()
        for task in list(sessions):
            task.cancel()
        if sessions:
            await asyncio.wait(sessions, timeout=self.config.limits.drain_timeout)
        await self._release()

    async def _release(self) -> None:
        """Stop the batchers, worker threads and signing processes (after a drain, or a
        failed start)."""
        for batcher in self._batchers.values():
            await batcher.drain()
        for executor in (self._executor, self._checkers):
            executor.shutdown(wait=True)
        self._signing.close()


@asynccontextmanager
async def open_edge(
    config: EdgeConfig,
    *,
    provider: EvidenceProvider,
    models: ModelRegistry,
    allowed_devices: Container[bytes] | None = None,
    journal: RecordSink | None = None,
    clock: Callable[[], float] = time.time,
    random_bytes: Callable[[int], bytes] = os.urandom,
    identity: EnclaveIdentity | None = None,
) -> AsyncIterator[EdgeService]:
    """Start the edge on ``config.host:config.port``; leaving the block drains and stops it.

    ``identity`` (TLS credentials and signing key) is created from ``provider`` unless given.
    """
    if not len(models):
        raise ConfigError("the edge needs at least one registered model")
    if identity is None:
        identity = await asyncio.to_thread(create_identity, provider, now=int(clock()))
    edge = EdgeService(
        config,
        provider=provider,
        identity=identity,
        models=models,
        allowed_devices=config.allowed_devices if allowed_devices is None else allowed_devices,
        journal=journal if journal is not None else MemoryJournal(),
        clock=clock,
        random_bytes=random_bytes,
    )
    sessions: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The session runs in its own task, so shutdown can cancel it without the stream
        # callback task (owned by asyncio) seeing the cancellation.
        task = asyncio.create_task(serve_session(edge, reader, writer))
        sessions.add(task)
        try:
            await asyncio.wait({task})
        finally:
            sessions.discard(task)

    try:
        ctx = server_context(
            identity.credentials.cert_pem.encode(), identity.credentials.key_pem.encode()
        )
        await edge._start()
        try:
            server = await asyncio.start_server(
                on_connect,
                config.host,
                config.port,
                ssl=ctx,
                ssl_handshake_timeout=config.limits.handshake_timeout,
                limit=1 << 16,
            )
        except OSError as exc:
            raise ChannelError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
    except BaseException:
        await edge._release()
        raise
    edge.port = server.sockets[0].getsockname()[1]
    try:
        yield edge
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        await edge._drain(sessions)


def _us(seconds: float) -> int:
    """``seconds`` as whole microseconds in a protocol u32."""
    return min(max(0, int(seconds * 1e6)), 2**32 - 1)
