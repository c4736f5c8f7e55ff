"""Device sessions: split inference against one attested edge enclave.

``open_session`` connects with TLS 1.3 and verifies the edge's RA-TLS certificate under the
policy before a single byte is written; then it authenticates the device key over the channel
binding, and, when the policy wants fresh evidence, challenges the enclave with a nonce. The
enclave's signing address arrives inside that attested channel, so every signed result can be
attributed to the measured enclave. ``Session.infer`` runs the head, encodes the boundary with
the plan's codec, signs the ``TaskRequest`` record, sends it and waits for the matching
``InferResult``, whose signature and output commitment it checks before decoding the output.
Requests are pipelined: one reader task dispatches results to their waiters by task id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from secure_ci.attestation import (
    VerifiedEnclave,
)
from secure_ci.channel import FramedStream
from secure_ci.device._identity import DeviceIdentity
from secure_ci.device._tasks import EnclaveBinding, TaskReceipt, sign_request, verify_result
from secure_ci.exceptions import (
    ChannelError,
    ConfigError,
    DeadlineExceeded,
    PartitionError,
    ProtocolError,
    RemoteProtocolError,
    SecureCIError,
)
from secure_ci.ledger._records import LedgerDomain, TaskRequest
from secure_ci.partition import DEFAULT_CANONICAL, CanonicalRule, PartitionPlan
from secure_ci.partition._codec import decode_features, encode_features
from secure_ci.partition._guard import running
from secure_ci.protocol import (
    Close,
    Error,
    ErrorCode,
    Event,
    InferRequest,
    InferResult,
    Ping,
    Pong,
    State,
)

__all__ = ["DEFAULT_DOMAIN", "Input", "Output", "Session", "parse_edge_address"]

log = logging.getLogger(__name__)

Output: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...]
Input: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...]
"""One sample: a tensor, or a tuple of tensors for a model with several inputs."""
DEFAULT_DOMAIN = LedgerDomain(chain_id=0, contract=bytes(20))
"""EIP-712 domain used until a ledger is deployed (chain id 0, zero contract)."""
RECEIPT_WINDOW = 4096
"""Receipts a session keeps in memory (oldest dropped first)."""
CLOSE_GRACE = 5.0
"""Seconds an orderly close waits for the edge to answer what is in flight."""


def parse_edge_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); ConfigError if malformed."""
    host, sep, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"edge address must be HOST:PORT, not {address!r}")
    return host, int(port_text)


@dataclass
class _Task:
    """One request in flight: what was sent and who waits for the answer."""

    request: InferRequest
    record: TaskRequest
    future: asyncio.Future[tuple[InferResult, TaskReceipt]]


class Session:
    """An authenticated session with one edge (make it with :func:`open_session`)."""

    def __init__(
        self,
        stream: FramedStream,
        *,
        enclave: VerifiedEnclave,
        binding: EnclaveBinding,
        identity: DeviceIdentity,
        head: nn.Module,
        plan: PartitionPlan,
        domain: LedgerDomain,
        timeout: float,
        clock: Callable[[], float],
        random_bytes: Callable[[int], bytes],
        first_seq: int,
        canonical: CanonicalRule = DEFAULT_CANONICAL,
    ) -> None:
        self.enclave = enclave
        self.binding = binding
        self.identity = identity
        self.plan = plan
        self.canonical = canonical
        """The model's canonical output rule, which every result's commitment must open to."""
        self.domain = domain
        self.timeout = timeout
        self.receipts: deque[TaskReceipt] = deque(maxlen=RECEIPT_WINDOW)
        """The last :data:`RECEIPT_WINDOW` receipts (a bounded window: the device journal,
        ``secure_ci.device._journal``, is where a device keeps every receipt)."""
        self.unanswered: list[tuple[TaskRequest, bytes]] = []
        """Signed requests sent without a verified result (refused, failed, timed out, or a
        result that did not verify): the device can challenge the edge with each (a
        request-only challenge), so dropping a request leaves evidence."""
        self._stream = stream
        self._head = head
        self._model_id = bytes.fromhex(plan.model_id)
        self._clock = clock
        self._random = random_bytes
        self._next_seq = first_seq
        self._prev_request = bytes(32)  # struct hash of the last request sent (request chain)
        self._tasks: dict[bytes, _Task] = {}
        self._slots = asyncio.Semaphore(stream.connection.max_in_flight)
        self._failure: SecureCIError | None = None
        self._failed = asyncio.Event()
        self._on_failure: list[Callable[[SecureCIError], None]] = []
        self._pong: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def bytes_sent(self) -> int:
        """Protocol bytes this session has sent (frames, before TLS)."""
        return self._stream.bytes_sent

    @property
    def max_in_flight(self) -> int:
        """Requests that may be in flight at once (our limit, lowered to the edge's)."""
        return self._stream.connection.max_in_flight

    # -- inference ----------------------------------------------------------------------

    async def infer(self, x: Input) -> Output:
        """Run ``x`` (one sample, size 1 along the batch; a tuple for a model with several
        inputs) through head, edge and tail.

        Raises DeadlineExceeded after ``timeout`` seconds, RemoteProtocolError (with the
        edge's code) for an error frame, SignatureError for a result the enclave did not sign.
        """
        if self._failure is not None:
            raise self._failure
        payload = await asyncio.to_thread(self.encode_input, x)
        output, _ = await self.infer_encoded(payload)
        return output

    async def infer_encoded(
        self, payload: bytes, *, salt: bytes | None = None
    ) -> tuple[Output, TaskReceipt]:
        """Send features the head already encoded (with this plan's codec); the output and
        the task's receipt. ``salt`` fixes the input commitment (and so the default task id):
        the same features with the same salt are the same task at every edge."""
        future = await self.submit(payload, salt=salt)
        try:
            async with asyncio.timeout(self.timeout):
                result, receipt = await asyncio.shield(future)
        except TimeoutError:
            # The edge went silent: the whole session fails, so every waiter gets
            # DeadlineExceeded at once and every in-flight slot is freed (the protocol would
            # otherwise count the unanswered requests against the edge's in-flight limit).
            silent = DeadlineExceeded(
                f"no result within {self.timeout} s: the session with the edge is closed"
            )
            self._fail(silent)
            raise silent from None
        if receipt.result.status != 0:
            raise RemoteProtocolError(
                f"the enclave reported status {receipt.result.status}", code=ErrorCode.INTERNAL
            )
        return await asyncio.to_thread(self._decode_output, result.payload), receipt

    async def submit(
        self,
        payload: bytes,
        *,
        salt: bytes | None = None,
        cut: int | None = None,
        codec: str | None = None,
    ) -> asyncio.Future[tuple[InferResult, TaskReceipt]]:
        """Sign and send one request (waiting for a free in-flight slot); the future of its
        verified result and receipt. ``cut`` and ``codec`` override the plan's for this task
        (the edge serves every cut of the model it has resident, so a switch is a header
        change). The future fails when the edge refuses, the result does not verify, or the
        session fails; no deadline is kept here: :meth:`infer_encoded` keeps ``timeout``."""
        await self._slots.acquire()
        try:
            task = await self._submit(payload, salt=salt, cut=cut, codec=codec)
        except BaseException:
            self._slots.release()
            raise
        task.future.add_done_callback(self._release_slot)  # a late answer frees it too
        return task.future

    def fail(self, exc: SecureCIError) -> None:
        """Give the session up: every waiter gets ``exc`` and its slots are freed."""
        self._fail(exc)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def on_failure(self, callback: Callable[[SecureCIError], None]) -> None:
        """Call ``callback(why)`` the moment the session fails (when the reader sees the
        connection end, in the same step that fails the tasks in flight), or now if it has
        failed. For a fleet that must stop planning onto a dead edge without waiting for a
        task of its own to wake up."""
        if self._failure is not None:
            callback(self._failure)
        else:
            self._on_failure.append(callback)

    async def wait_failed(self) -> SecureCIError:
        """Wait until the session fails (the edge closed, crashed or went silent); why."""
        await self._failed.wait()
        return self._failure or ChannelError("the session failed")

    async def ping(self, padding: int = 0) -> None:
        """Probe the channel: a ``Ping`` carrying ``padding`` bytes, answered by a ``Pong``
        (within ``timeout``, else the session fails like a silent edge). Time it to measure
        the round trip, and with padding the link's bandwidth as well; one at a time."""
        if self._failure is not None:
            raise self._failure
        if self._pong is not None:
            raise ChannelError("a ping is already in flight on this session")
        nonce = self._random(32)
        self._pong = asyncio.get_running_loop().create_future()
        try:
            await self._stream.send(Ping(nonce=nonce, padding=bytes(padding)))
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(self._pong)
        except TimeoutError:
            silent = DeadlineExceeded(f"no answer to a ping within {self.timeout} s")
            self._fail(silent)
            raise silent from None
        finally:
            self._pong = None

    def decode_output(self, payload: bytes) -> Output:
        """A result's payload as the model's output (bounded by the session's limits)."""
        return self._decode_output(payload)

    async def infer_stream(
        self,
        xs: Iterable[Input] | AsyncIterable[Input],
        *,
        max_in_flight: int | None = None,
    ) -> AsyncIterator[Output]:
        """Pipeline ``xs`` with up to ``max_in_flight`` requests out; yield outputs in order."""
        window = max(1, min(max_in_flight or self.max_in_flight, self.max_in_flight))
        pending: deque[asyncio.Task[Output]] = deque()
        try:
            async for x in _aiter(xs):
                pending.append(asyncio.create_task(self.infer(x)))
                if len(pending) >= window:
                    yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def infer_many(
        self,
        xs: Iterable[Input] | AsyncIterable[Input],
        *,
        max_in_flight: int | None = None,
    ) -> list[Output]:
        """All outputs of :meth:`infer_stream`, in input order."""
        return [y async for y in self.infer_stream(xs, max_in_flight=max_in_flight)]

    def _release_slot(self, future: asyncio.Future[Any]) -> None:
        self._slots.release()
        if not future.cancelled():
            future.exception()  # retrieved: a waiter that timed out does not log it

    def encode_input(self, x: Input) -> bytes:
        """Run the head on ``x`` (a tensor, or a tuple of tensors for a model with several
        inputs) and encode the boundary with the plan's codec (blocking)."""
        inputs = x if isinstance(x, tuple) else (x,)
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise PartitionError(
                f"input must be a torch.Tensor or a tuple of them, not {type(x).__name__}"
            )
        with running(), torch.inference_mode():
            out = self._head(*inputs)
        tensors = out if isinstance(out, tuple) else (out,)
        return encode_features(tensors, self.plan.codec)

    def _decode_output(self, payload: bytes) -> Output:
        limit = self._stream.connection.limits.max_payload_bytes
        tensors = decode_features(payload, max_bytes=limit)
        return tensors[0] if len(tensors) == 1 else tensors

    async def _submit(
        self, payload: bytes, *, salt: bytes | None, cut: int | None, codec: str | None
    ) -> _Task:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise ChannelError("the session is closing")
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        event, record = sign_request(
            self.identity,
            enclave=self.binding,
            domain=self.domain,
            model_id=self._model_id,
            cut=self.plan.cut if cut is None else cut,
            codec=self.plan.codec if codec is None else codec,
            device_seq=seq,
            deadline=int(self._clock() + self.timeout) + 1,
            salt=self._random(32) if salt is None else salt,
            payload=payload,
            prev_request=self._prev_request,
        )
        self._prev_request = record.struct_hash()
        task = _Task(event, record, asyncio.get_running_loop().create_future())
        self._tasks[event.task_id] = task
        try:
            await self._stream.send(event)
        except BaseException:
            self._tasks.pop(event.task_id, None)
            raise
        return task

    # -- the reader ---------------------------------------------------------------------

    async def _read(self) -> None:
        """Dispatch results to their waiters until the edge closes or the session fails."""
        try:
            while True:
                event = await self._stream.next_event()
                if isinstance(event, Close):
                    if not self._closing:
                        raise ChannelError("the edge closed the session")
                    return
                self._dispatch(event)
        except (ProtocolError, ChannelError) as exc:
            self._fail(exc)
            if self._stream.connection.state is State.ERROR:
                await self._stream.send_fatal(exc)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Pong):  # the connection checked that it answers our Ping
            if self._pong is not None and not self._pong.done():
                self._pong.set_result(None)
            return
        if isinstance(event, Error) and event.task_id is None:
            raise RemoteProtocolError(f"edge error: {event.reason}", code=event.code)
        task_id = getattr(event, "task_id", None)
        task = self._tasks.pop(task_id, None) if isinstance(task_id, bytes) else None
        if task is None or task.future.done():  # the protocol passes answers to tasks in flight
            raise RemoteProtocolError("unexpected event", code=ErrorCode.UNEXPECTED)
        if isinstance(event, Error):
            self.unanswered.append((task.record, task.request.signature))
            task.future.set_exception(
                RemoteProtocolError(f"edge refused the task: {event.reason}", code=event.code)
            )
        elif isinstance(event, InferResult):
            try:
                receipt = verify_result(
                    event, task.request, task.record, enclave=self.binding, domain=self.domain,
                    canonical=self.canonical,
                    max_bytes=self._stream.connection.limits.max_payload_bytes,
                )  # fmt: skip
            except SecureCIError as exc:
                self.unanswered.append((task.record, task.request.signature))
                task.future.set_exception(exc)
                return
            self.receipts.append(receipt)
            task.future.set_result((event, receipt))
        else:
            raise RemoteProtocolError(
                f"unexpected {type(event).__name__}", code=ErrorCode.UNEXPECTED
            )

    def _fail(self, exc: SecureCIError) -> None:
        first = self._failure is None
        if first:
            log.debug("session with %s ended: %s", self.binding.address.hex(), exc)
            self._failure = exc
            self._failed.set()
        for task in self._tasks.values():
            if not task.future.done():
                self.unanswered.append((task.record, task.request.signature))
                task.future.set_exception(exc)
        self._tasks.clear()
        if self._pong is not None and not self._pong.done():
            self._pong.set_exception(exc)
        if first:  # after the tasks in flight: theirs is the fail-over that waits
            callbacks, self._on_failure = self._on_failure, []
            for callback in callbacks:
                callback(exc)

    async def _close(self) -> None:
        """Say Close, let the edge answer what is in flight (bounded), then disconnect."""
        self._closing = True
        if self._failure is None and not self._stream.connection.our_closed:
            with contextlib.suppress(SecureCIError):
                await self._stream.send(Close())


async def _aiter(xs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(xs, AsyncIterable):
        async for x in xs:
            yield x
    else:
        for x in xs:
            yield x
